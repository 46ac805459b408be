"""Independent pure-Python port of llama.cpp's byte-level BPE path, used as a test oracle.

* ``qwen_split`` ports ``unicode_regex_split_custom_qwen2`` / ``..._qwen35`` (src/unicode.cpp) line by line: the
  hand-written matcher llama.cpp actually runs for the qwen2/qwen35 regexes (``\\s`` is exactly llama.cpp's
  whitespace table; unassigned code points carry the UNDEFINED flag, so they join punctuation runs like in a regex).
* ``bpe_session`` ports ``llm_tokenizer_bpe_session::tokenize`` (src/llama-vocab.cpp): a heap of adjacent pairs
  ordered by merge rank then leftmost position, stale entries skipped, unmerged leftovers emitted byte by byte.

Character classes come from Python's ``unicodedata`` (llama.cpp generates its tables from UnicodeData.txt too; the
versions may differ for recently assigned code points only).
"""

from __future__ import annotations

import heapq
import unicodedata

# src/unicode-data.cpp unicode_set_whitespace
WHITESPACE = frozenset([0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029,
                        0x202F, 0x205F, 0x3000])

OUT_OF_RANGE = 0xFFFFFFFF


class _Flags:
    __slots__ = ("defined", "letter", "mark", "number", "ws")

    def __init__(self, cpt: int | None):
        if cpt is None:
            self.letter = self.number = self.mark = self.ws = self.defined = False
            return
        cat = unicodedata.category(chr(cpt))
        self.letter = cat[0] == "L"
        self.number = cat[0] == "N"
        self.mark = cat[0] == "M"
        self.ws = cpt in WHITESPACE
        self.defined = True  # as_uint() != 0: every in-range code point has a flag (Cn -> UNDEFINED = 0x0001)


def qwen_split(text: str, qwen35: bool = False) -> list[str]:
    """Pre-tokenizer words of ``text`` as llama.cpp's custom qwen2 (or qwen35) splitter produces them."""
    cpts = [ord(c) for c in text]
    end = len(cpts)

    def cpt_at(p):
        return cpts[p] if 0 <= p < end else OUT_OF_RANGE

    def flags_at(p):
        return _Flags(cpts[p] if 0 <= p < end else None)

    def is_letterish(f):
        return f.letter or (qwen35 and f.mark)

    words = []
    prev_end = 0

    def add(e):
        nonlocal prev_end
        n = e - prev_end
        if n > 0:
            words.append(text[prev_end:e])
        prev_end = e
        return n

    pos = 0
    while pos < end:
        cpt = cpt_at(pos)
        fl = flags_at(pos)
        # (?i:'s|'t|'re|'ve|'m|'ll|'d)
        if cpt == ord("'") and pos + 1 < end:
            nxt = chr(cpt_at(pos + 1)).lower()
            if nxt in ("s", "t", "m", "d"):
                pos += add(pos + 2)
                continue
            if pos + 2 < end:
                nn = chr(cpt_at(pos + 2)).lower()
                if (nxt, nn) in (("r", "e"), ("v", "e"), ("l", "l")):
                    pos += add(pos + 3)
                    continue
        # [^\r\n\p{L}\p{N}]?\p{L}+   (qwen35: [\p{L}\p{M}]+)
        if not (cpt in (0x0D, 0x0A) or fl.number) and (is_letterish(fl) or is_letterish(flags_at(pos + 1))):
            pos += 1
            while is_letterish(flags_at(pos)):
                pos += 1
            add(pos)
            continue
        # \p{N}
        if fl.number:
            pos += 1
            add(pos)
            continue
        # <space>?[^\s\p{L}\p{N}]+[\r\n]*
        f2 = flags_at(pos + 1) if cpt == 0x20 else fl

        def punct(f):
            return not (f.ws or is_letterish(f) or f.number) and f.defined

        if not (f2.ws or is_letterish(f2) or f2.number) and fl.defined:
            pos += cpt == 0x20
            while punct(f2):
                pos += 1
                f2 = flags_at(pos)
            c2 = cpt_at(pos)
            while c2 in (0x0D, 0x0A):
                pos += 1
                c2 = cpt_at(pos)
            add(pos)
            continue
        n_ws = 0
        last_rn = 0
        while flags_at(pos + n_ws).ws:
            if cpt_at(pos + n_ws) in (0x0D, 0x0A):
                last_rn = pos + n_ws + 1
            n_ws += 1
        if last_rn > 0:  # \s*[\r\n]+
            pos = last_rn
            add(pos)
            continue
        if n_ws > 1 and cpt_at(pos + n_ws) != OUT_OF_RANGE:  # \s+(?!\S)
            pos += n_ws - 1
            add(pos)
            continue
        if n_ws > 0:  # \s+
            pos += n_ws
            add(pos)
            continue
        pos += 1  # no match
        add(pos)
    return words


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte -> char table, written out independently of the package."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


_B2U = bytes_to_unicode()


def bpe_session(word: str, token_to_id: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    """llm_tokenizer_bpe_session::tokenize for one pre-tokenizer word (raw text; byte-encoded here)."""
    enc = "".join(_B2U[b] for b in word.encode("utf-8"))
    sym = list(enc)
    n = len(sym)
    nxt = [i + 1 for i in range(n)]
    if n:
        nxt[-1] = -1
    prv = [i - 1 for i in range(n)]
    heap = []

    def add_bigram(left, right):
        if left == -1 or right == -1:
            return
        r = ranks.get((sym[left], sym[right]))
        if r is None:
            return
        heapq.heappush(heap, (r, left, right, sym[left] + sym[right]))

    for i in range(1, n):
        add_bigram(i - 1, i)
    while heap:
        _, left, right, text = heapq.heappop(heap)
        if not sym[left] or not sym[right] or sym[left] + sym[right] != text:
            continue
        sym[left] = text
        sym[right] = ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        add_bigram(prv[left], left)
        add_bigram(left, nxt[left])
    out = []
    i = 0 if n else -1
    while i != -1:
        s = sym[i]
        if s:
            tid = token_to_id.get(s)
            if tid is None:
                out.extend(token_to_id[c] for c in s if c in token_to_id)
            else:
                out.append(tid)
        i = nxt[i]
    return out


def encode(text: str, tokens: list[str], types: list[int], merges: list[str], qwen35: bool = False,
           parse_special: bool = True) -> list[int]:
    """Whole llama.cpp BPE tokenize (no BOS: Qwen's add_bos_token is false): special-token partition, then the
    splitter and BPE session on each text fragment."""
    token_to_id = {t: i for i, t in enumerate(tokens)}
    ranks = {}
    for r, m in enumerate(merges):
        k = m.find(" ", 1)
        ranks.setdefault((m[:k], m[k + 1 :]), r)
    kinds = (3, 4, 2) if parse_special else (4,)
    specials = sorted((i for i, ty in enumerate(types) if ty in kinds), key=lambda i: -len(tokens[i].encode()))
    frags: list = [text] if text else []
    for sid in specials:
        st = tokens[sid]
        new = []
        for fr in frags:
            if isinstance(fr, int):
                new.append(fr)
                continue
            while True:
                k = fr.find(st)
                if k < 0:
                    break
                if k:
                    new.append(fr[:k])
                new.append(sid)
                fr = fr[k + len(st) :]
            if fr:
                new.append(fr)
        frags = new
    out = []
    for fr in frags:
        if isinstance(fr, int):
            out.append(fr)
        else:
            for w in qwen_split(fr, qwen35):
                out.extend(bpe_session(w, token_to_id, ranks))
    return out
