"""JSON mode by constrained decoding: every generated token keeps the reply a prefix of
one JSON object, and the reply ends (eos) exactly when the object is complete.

`JSONPrefix` is a small pushdown automaton over bytes (the grammar of RFC 8259, with
UTF-8 checked inside strings); it is cloned to try a token without committing.
`JSONConstraint.pick` chooses the next token: greedy takes the likeliest token whose
bytes keep the prefix valid, trying the top 8, then 64, 512 and finally the whole
vocabulary in logit order; sampling draws, and on a rejection masks that token and draws
again. A token's bytes come from `Tokenizer.token_bytes` (cached), so a step decodes
only the few candidates it looks at, never the vocabulary.

Shortcuts, labelled: whitespace outside strings is one space, or a newline and up to 20
spaces or tabs of indent, between two tokens of JSON (llama.cpp's json grammar does the
same), so a model cannot idle in whitespace forever; a reply cut by max_tokens is an unfinished
object, as with any server's JSON mode (finish_reason "length").
"""

from __future__ import annotations

import torch

# Modes of the automaton.
VALUE, KEY_OR_END, KEY, COLON, AFTER, VALUE_OR_END, STRING, NUMBER, LITERAL, DONE, START = range(11)
# Number sub-states: after '-', after a leading 0, in integer digits, after '.', in fraction
# digits, after 'e', after the exponent's sign, in exponent digits.
N_SIGN, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP = range(8)
_NUMBER_DONE = (N_ZERO, N_INT, N_FRAC, N_EXP)
# The number's moves: sub-state -> {byte class -> next sub-state}, the classes "0", "1-9",
# "e" (e or E) and the byte itself ("." "+" "-"); a byte with no move ends the number.
_NUMBER_MOVES = {
    N_SIGN: {"0": N_ZERO, "1-9": N_INT},
    N_ZERO: {".": N_DOT, "e": N_E},
    N_INT: {"0": N_INT, "1-9": N_INT, ".": N_DOT, "e": N_E},
    N_DOT: {"0": N_FRAC, "1-9": N_FRAC},
    N_FRAC: {"0": N_FRAC, "1-9": N_FRAC, "e": N_E},
    N_E: {"+": N_ESIGN, "-": N_ESIGN, "0": N_EXP, "1-9": N_EXP},
    N_ESIGN: {"0": N_EXP, "1-9": N_EXP},
    N_EXP: {"0": N_EXP, "1-9": N_EXP},
}
_WS = b" \t\n\r"
MAX_INDENT = 20


class JSONPrefix:
    """Is what has been fed so far the start of one JSON object (top level: an object)?
    feed(data) -> False (and an undefined state) as soon as a byte cannot continue it."""

    __slots__ = ("mode", "stack", "sub", "key", "esc", "hexes", "utf8", "literal", "ws")

    def __init__(self):
        self.mode = START
        self.stack = ""  # open containers, innermost last: "{" or "["
        self.sub = 0  # number sub-state
        self.key = False  # the string being read is an object key
        self.esc = False  # after a backslash in a string
        self.hexes = 0  # \uXXXX digits still to read
        self.utf8 = 0  # UTF-8 continuation bytes still to read
        self.literal = b""  # the rest of true / false / null
        self.ws = 0  # whitespace since the last token: 0 none, -1 one space, n > 0 a newline and n-1 indents

    def clone(self) -> "JSONPrefix":
        other = JSONPrefix.__new__(JSONPrefix)
        for name in JSONPrefix.__slots__:
            setattr(other, name, getattr(self, name))
        return other

    @property
    def complete(self) -> bool:
        return self.mode == DONE

    def feed(self, data: bytes) -> bool:
        for b in data:
            if not self._byte(b):
                return False
        return True

    def _close_value(self) -> None:
        self.mode = AFTER if self.stack else DONE

    def _byte(self, b: int) -> bool:  # noqa: C901 - one automaton, read top to bottom
        mode = self.mode
        if mode == STRING:
            return self._string_byte(b)
        if mode == NUMBER:
            if self._number_byte(b):
                return True
            if self.sub not in _NUMBER_DONE:
                return False
            self._close_value()  # the number ended; this byte belongs to what follows
            mode = self.mode
        if mode == LITERAL:
            if b != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            if not self.literal:
                self._close_value()
            return True
        if b in _WS:
            return self._space(b)
        self.ws = 0
        if mode == DONE:
            return False
        if mode == START:
            if b != ord("{"):
                return False
            self.stack, self.mode = "{", KEY_OR_END
            return True
        if mode in (VALUE, VALUE_OR_END):
            if mode == VALUE_OR_END and b == ord("]"):
                self.stack = self.stack[:-1]
                self._close_value()
                return True
            return self._value_start(b)
        if mode in (KEY_OR_END, KEY):
            if mode == KEY_OR_END and b == ord("}"):
                self.stack = self.stack[:-1]
                self._close_value()
                return True
            if b != ord('"'):
                return False
            self.mode, self.key = STRING, True
            return True
        if mode == COLON:
            if b != ord(":"):
                return False
            self.mode = VALUE
            return True
        if mode == AFTER:
            top = self.stack[-1]
            if b == ord(","):
                self.mode = KEY if top == "{" else VALUE
                return True
            if (top == "{" and b == ord("}")) or (top == "[" and b == ord("]")):
                self.stack = self.stack[:-1]
                self._close_value()
                return True
            return False
        return False

    def _space(self, b: int) -> bool:
        if self.ws == 0:
            if b == ord(" "):
                self.ws = -1
                return True
            if b == ord("\n"):
                self.ws = 1
                return True
            return False
        if self.ws > 0 and b in b" \t" and self.ws <= MAX_INDENT:
            self.ws += 1
            return True
        return False

    def _value_start(self, b: int) -> bool:
        c = chr(b)
        if c == "{":
            self.stack += "{"
            self.mode = KEY_OR_END
        elif c == "[":
            self.stack += "["
            self.mode = VALUE_OR_END
        elif c == '"':
            self.mode, self.key = STRING, False
        elif c == "-":
            self.mode, self.sub = NUMBER, N_SIGN
        elif c == "0":
            self.mode, self.sub = NUMBER, N_ZERO
        elif "1" <= c <= "9":
            self.mode, self.sub = NUMBER, N_INT
        elif c in "tfn":
            self.mode, self.literal = LITERAL, {"t": b"rue", "f": b"alse", "n": b"ull"}[c]
        else:
            return False
        return True

    def _string_byte(self, b: int) -> bool:
        if self.utf8:
            if not 0x80 <= b <= 0xBF:
                return False
            self.utf8 -= 1
            return True
        if self.hexes:
            if chr(b) not in "0123456789abcdefABCDEF":
                return False
            self.hexes -= 1
            return True
        if self.esc:
            self.esc = False
            if b == ord("u"):
                self.hexes = 4
                return True
            return chr(b) in '"\\/bfnrt'
        if b == ord('"'):
            if self.key:
                self.mode = COLON
            else:
                self._close_value()
            return True
        if b == ord("\\"):
            self.esc = True
            return True
        if b < 0x20:
            return False  # control characters must be escaped
        if b < 0x80:
            return True
        if 0xC2 <= b <= 0xDF:
            self.utf8 = 1
        elif 0xE0 <= b <= 0xEF:
            self.utf8 = 2
        elif 0xF0 <= b <= 0xF4:
            self.utf8 = 3
        else:
            return False
        return True

    def _number_byte(self, b: int) -> bool:
        c = chr(b)
        kind = "0" if c == "0" else "1-9" if "1" <= c <= "9" else "e" if c in "eE" else c
        nxt = _NUMBER_MOVES[self.sub].get(kind)
        if nxt is None:
            return False
        self.sub = nxt
        return True


class JSONConstraint:
    """Picks each next token so that the reply stays a JSON object prefix; eos only once
    the object is complete (and then at once). One per generation."""

    def __init__(self, tokenizer, eos_ids: set[int]):
        if not eos_ids:
            raise ValueError("JSON mode needs an end-of-sequence token")
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        eos = tokenizer.eos_token_id
        self.eos = eos if eos in self.eos_ids else min(self.eos_ids)
        self.state = JSONPrefix()
        self.tried = 0  # candidates looked at, for tests and the curious

    def _accepts(self, token: int) -> JSONPrefix | None:
        self.tried += 1
        if token in self.eos_ids:
            return None  # never before the object is complete, and after it pick() returns eos itself
        data = self.tokenizer.token_bytes(token)
        if not data:
            return None
        state = self.state.clone()
        return state if state.feed(data) else None

    def _take(self, token: int, state: JSONPrefix) -> int:
        self.state = state
        return token

    def pick(self, logits: torch.Tensor, params, generator: torch.Generator | None) -> int:
        """logits [V] where the model left them -> the next token id."""
        if self.state.complete:
            return self.eos
        if params.temperature > 0:
            from moerun.generate import filtered_probs

            probs = filtered_probs(logits.float().cpu(), params)
            for _ in range(8):
                if float(probs.sum()) <= 0:
                    break
                token = int(torch.multinomial(probs, 1, generator=generator))
                state = self._accepts(token)
                if state is not None:
                    return self._take(token, state)
                probs[token] = 0.0
            # Many rejections: the likeliest valid tokens among those left in the nucleus.
            kept = torch.nonzero(probs > 0).flatten()
            for token in kept[torch.argsort(probs[kept], descending=True)].tolist():
                state = self._accepts(token)
                if state is not None:
                    return self._take(token, state)
        seen = 0
        for k in (8, 64, 512, logits.numel()):
            k = min(k, logits.numel())
            for token in torch.topk(logits, k).indices.tolist()[seen:]:
                state = self._accepts(token)
                if state is not None:
                    return self._take(token, state)
            seen = k
            if k == logits.numel():
                break
        from moerun.errors import MoerunError

        raise MoerunError("JSON mode: no token of the vocabulary can continue the reply")
