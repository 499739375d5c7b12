"""Phrase bans: text the generation must never contain, undone by backtracking (the community's
"anti-slop").

When the text not yet given out contains a banned phrase, the generation rewinds to the token
whose text holds the phrase's first character, bans that token at that position and picks again
(generation.py drives it; the backend removes the rewound positions from both rows of the CFG
pair). Until a phrase is decided, the text that could still become one is held back, so nothing
rewound is ever streamed.

Matching is case-insensitive unless asked otherwise: KoboldCpp lowercases its `banned_tokens`
strings and the text before it compares them (gpttype_adapter.cpp, the anti-slop detection), and
exllamav2's `banned_strings` (TabbyAPI) are case-insensitive too.

Reference: KoboldCpp `gpttype_adapter.cpp` (`banned_phrases`, `antislop_banned_token_ids`,
`ContextRewind`); TabbyAPI / exllamav2 `banned_strings`.
"""

from __future__ import annotations

from typing import Sequence

# Rewinds to one position (over the whole generation) before the phrase found there is let
# through: each rewind bans one more first token, and a model that insists on a phrase through 16
# other spellings would otherwise spend a step per token of its vocabulary. It also bounds a
# generation's rewinds by 16 per token.
MAX_REWINDS_PER_POSITION = 16


def fold(text: str) -> str:
    """Lower case, character by character, so that positions stay positions ("İ".lower() would
    add a character; such characters are compared as written)."""
    return "".join(c if len(low := c.lower()) != 1 else low for c in text)


class PhraseBans:
    """The banned phrases of one generation, and where they are in a text.

    Args:
        phrases (`Sequence[str]`): the banned phrases; empty ones are ignored.
        case_sensitive (`bool`, defaults to False): compare as written instead of in lower case.
    """

    def __init__(self, phrases: Sequence[str], case_sensitive: bool = False):
        self.case_sensitive = bool(case_sensitive)
        self.phrases = sorted({self._norm(p) for p in phrases if p})

    def __bool__(self) -> bool:
        return bool(self.phrases)

    def _norm(self, text: str) -> str:
        return text if self.case_sensitive else fold(text)

    def find(self, text: str, start: int = 0) -> int:
        """Where the first banned phrase in `text[start:]` begins (an index into `text`), or -1."""
        text = self._norm(text[start:])
        hits = [at for at in (text.find(p) for p in self.phrases) if at >= 0]
        return start + min(hits) if hits else -1

    def open_start(self, text: str, start: int = 0) -> int:
        """The first index i >= `start` from which `text[i:]` is the beginning of a banned phrase,
        not all of it (the text that must wait for the next tokens), or len(text) when there is
        none. A whole phrase is `find`'s business."""
        text_n = self._norm(text)
        for i in range(start, len(text)):
            tail = text_n[i:]
            if any(len(tail) < len(p) and p.startswith(tail) for p in self.phrases):
                return i
        return len(text)
