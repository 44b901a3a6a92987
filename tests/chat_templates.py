"""Published chat templates (or their message-rendering part, verbatim) of the families whose
tool-call formats moerun parses, for tests that render a real assistant turn and parse it
back (tests/test_tool_calls.py), read from their files in tests/templates/. Qwen3's and
Qwen3.5's whole templates are read in tests/tokenizer_fixtures.py."""

from tests.tokenizer_fixtures import published_template

# mistralai/Mistral-7B-Instruct-v0.3 (v3 tokenizer; Mixtral-8x22B-Instruct-v0.1's tool_use
# template writes calls the same way): the whole template.
MISTRAL_V3_TEMPLATE = published_template("mistral_v3.jinja")

# The v13 templates (Ministral 3, Devstral Small 2): their assistant tool-call branch,
# verbatim, inside a minimal [INST] loop.
MISTRAL_V13_TEMPLATE = published_template("mistral_v13.jinja")

# openai/gpt-oss-20b's chat template: its message loop and generation prompt, verbatim (the
# system and developer messages, with the TypeScript rendering of tools, are left out).
GPT_OSS_TEMPLATE = published_template("gpt_oss.jinja")

# meta-llama/Llama-4-Scout-17B-16E-Instruct (as transformers' convert_llama4_weights_to_hf
# writes it): its message loop and generation prompt, verbatim (the system message and the
# tools-in-first-user-message preamble are left out).
LLAMA4_TEMPLATE = published_template("llama4.jinja")
