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

TEMPLATES = {"chatml": CHATML_TEMPLATE, "mistral": MISTRAL_TEMPLATE}


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
def _tokenizer_json(post_bos: bool) -> str:
    """Train once per flavour; the JSON is cached because training is the slow part."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=_utf8_alphabet(),
        show_progress=False,
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
    return tok.to_str()


def write_tokenizer(folder: Path, template: str | None = "chatml", template_in: str = "config") -> None:
    """Write a tiny trained BPE tokenizer (vocab 256) into `folder` in the Hub layout.

    template: "chatml" (Qwen-style; eos <|im_end|>, no BOS added on encode), "mistral"
    (Mixtral-instruct style; eos </s>, BOS added by the post-processor) or None (no chat
    template; ChatML-style tokens). template_in: "config" puts the template in
    tokenizer_config.json, "file" writes chat_template.jinja.
    """
    if template not in (None, *TEMPLATES):
        raise ValueError(f"unknown template {template!r}")
    if template_in not in ("config", "file"):
        raise ValueError(f"unknown template_in {template_in!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mistral = template == "mistral"
    (folder / "tokenizer.json").write_text(_tokenizer_json(post_bos=mistral), encoding="utf-8")

    added = {
        str(i): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, tok in enumerate(SPECIAL_TOKENS)
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
    else:
        config["bos_token"] = "<s>"
        config["eos_token"] = "<|im_end|>"
    if template is not None:
        if template_in == "file":
            (folder / "chat_template.jinja").write_text(TEMPLATES[template], encoding="utf-8")
        else:
            config["chat_template"] = TEMPLATES[template]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
