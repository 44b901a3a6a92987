"""A tiny byte-level BPE tokenizer in the Hub layout, for tests that need a real tokenizer folder.

`write_tokenizer(folder)` trains it with the `tokenizers` library on a small built-in corpus
(deterministic) and writes tokenizer.json + tokenizer_config.json (+ chat_template.jinja).
It loads with transformers.AutoTokenizer, which the tokenizer tests use as the oracle.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

TOKENIZER_VOCAB_SIZE = 256
# Published chat templates, each kept as its release's file is (tests/templates/*.jinja).
TEMPLATES_DIR = Path(__file__).parent / "templates"


def published_template(name: str) -> str:
    """tests/templates/`name`, byte for byte (no newline translation)."""
    return (TEMPLATES_DIR / name).read_bytes().decode("utf-8")


# Ids 0..5, in this order: the trainer puts special tokens first.
SPECIAL_TOKENS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]"]

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A mixture of experts routes each token to a few
experts, and the rest of the experts stay idle. The router picks the top experts for the token;
the experts that are in use stay in the cache, the others wait in the host memory.
Hello there! How are you today? I am fine, thank you, and you?
The weather is nice and the sun is shining over the hills and the sea.
"""

# Qwen2-style ChatML: an explicit system message first, else a default one.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'system' and loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Mixtral-8x7B-Instruct-v0.1 style: the system message folds into the first user turn,
# roles must alternate, assistant turns end with eos_token.
MISTRAL_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must "
    "alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception "
    "of an initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

# The chat template of Qwen/Qwen3.5-35B-A3B (its chat_template.jinja), byte for byte: SHA-256
# a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715, which Qwen3.5-4B/9B/27B/122B-A10B
# share (0.8B and 2B differ only in defaulting enable_thinking off). Thinking is on unless
# enable_thinking=False (then an empty think block); past turns keep their reasoning only after the
# last user query; XML-style <tool_call><function=...><parameter=...> calls; multimodal content lists.
QWEN3_5_TEMPLATE = published_template("qwen3_5.jinja")
QWEN3_5_TEMPLATE_SHA256 = "a4aee8afcf2e0711942cf848899be66016f8d14a889ff9ede07bca099c28f715"

# The Qwen3 hybrid-thinking template as the official Qwen3 repos' tokenizer_config.json carry it
# (the revision that reads `content is string`): no think block in the generation prompt unless
# enable_thinking=False (an empty one), reasoning kept only on turns after the last user query, JSON
# tool calls in <tool_call> tags, tool results folded into one user turn.
QWEN3_TEMPLATE = published_template("qwen3.jinja")

TEMPLATES = {
    "chatml": CHATML_TEMPLATE,
    "mistral": MISTRAL_TEMPLATE,
    "qwen3.5": QWEN3_5_TEMPLATE,
    "qwen3": QWEN3_TEMPLATE,
}
QWEN_TEMPLATES = ("qwen3.5", "qwen3")

# The Qwen flavour's added tokens, ids 0..8: Qwen's own order and special flags (the think and
# tool tags are added tokens but not special, so decoding with skip_special_tokens keeps them).
QWEN_ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<think>", False),
    ("</think>", False),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
]


def _utf8_alphabet() -> list[str]:
    """The ByteLevel characters of every byte that can occur in valid UTF-8.

    0xC0, 0xC1 and 0xF5..0xFF never do, and leaving them out frees 13 ids for merges
    within the 256-id budget while any valid text still round-trips.
    """
    # GPT-2's byte -> printable character table, as pre_tokenizers.ByteLevel uses it.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    never_in_utf8 = {0xC0, 0xC1, *range(0xF5, 0x100)}
    return [table[b] for b in range(256) if b not in never_in_utf8]


@lru_cache(maxsize=None)
def _tokenizer_json(post_bos: bool, qwen: bool = False) -> str:
    """Train once per flavour; the JSON is cached because training is the slow part.

    qwen: Qwen's added tokens (QWEN_ADDED_TOKENS) instead of SPECIAL_TOKENS, with their
    special flags, in the same 256 ids (fewer merges)."""
    specials = [content for content, _ in QWEN_ADDED_TOKENS] if qwen else SPECIAL_TOKENS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE, special_tokens=specials, initial_alphabet=_utf8_alphabet(), show_progress=False
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    assert tok.get_vocab_size() == TOKENIZER_VOCAB_SIZE, tok.get_vocab_size()
    if post_bos:
        # Llama/Mistral tokenizer.json files add BOS in the post-processor.
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
        )
    else:
        # Qwen's tokenizer.json: a ByteLevel post-processor that adds nothing.
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if not qwen:
        return tok.to_str()
    data = json.loads(tok.to_str())
    flags = dict(QWEN_ADDED_TOKENS)
    for entry in data["added_tokens"]:
        entry["special"] = flags[entry["content"]]
    return json.dumps(data, ensure_ascii=False)


def write_tokenizer(folder: Path, template: str | None = "chatml", template_in: str = "config") -> None:
    """Write a tiny trained BPE tokenizer (vocab 256) into `folder` in the Hub layout.

    template: "chatml" (Qwen-style; eos <|im_end|>, no BOS added on encode), "mistral"
    (Mixtral-instruct style; eos </s>, BOS added by the post-processor), "qwen3.5" / "qwen3"
    (the real Qwen3.5-35B-A3B / Qwen3 chat templates over Qwen's added tokens, QWEN_ADDED_TOKENS:
    no bos, eos <|im_end|>, pad <|endoftext|>) or None (no chat template; ChatML-style tokens).
    template_in: "config" puts the template in tokenizer_config.json, "file" writes
    chat_template.jinja.
    """
    if template not in (None, *TEMPLATES):
        raise ValueError(f"unknown template {template!r}")
    if template_in not in ("config", "file"):
        raise ValueError(f"unknown template_in {template_in!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mistral = template == "mistral"
    qwen = template in QWEN_TEMPLATES
    (folder / "tokenizer.json").write_text(_tokenizer_json(post_bos=mistral, qwen=qwen), encoding="utf-8")

    tokens = QWEN_ADDED_TOKENS if qwen else [(content, True) for content in SPECIAL_TOKENS]
    added = {
        str(i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for i, (content, special) in enumerate(tokens)
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "padding_side": "left",
    }
    if mistral:
        # Mistral repos write tokens as AddedToken dicts and carry add_bos_token; both forms are tested.
        config["bos_token"] = {"__type": "AddedToken", **added["0"]}
        config["eos_token"] = {"__type": "AddedToken", **added["1"]}
        config["add_bos_token"] = True
        config["add_eos_token"] = False
    elif qwen:
        # As Qwen3 / Qwen3.5 tokenizer_config.json: no bos token at all, pad <|endoftext|>.
        config["bos_token"] = None
        config["eos_token"] = "<|im_end|>"
        config["pad_token"] = "<|endoftext|>"
        config["unk_token"] = None
    else:
        config["bos_token"] = "<s>"
        config["eos_token"] = "<|im_end|>"
    if template is not None:
        if template_in == "file":
            (folder / "chat_template.jinja").write_text(TEMPLATES[template], encoding="utf-8")
        else:
            config["chat_template"] = TEMPLATES[template]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
