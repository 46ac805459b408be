"""Tokenizers built from GGUF metadata, reproducing llama.cpp's ``llama-vocab.cpp`` token for token.

Three vocabulary families are supported (``tokenizer.ggml.model``):

* ``llama`` — SentencePiece-style (Gemma 3): ``llm_tokenizer_spm_session``. ' ' becomes '▁', the text is split into
  UTF-8 characters, and the adjacent pair whose concatenation is a vocab token with the highest score is merged
  (leftmost on ties) until nothing merges; leftover characters fall back to ``<0xXX>`` byte tokens. Hand-written
  with a heap, like llama.cpp (O(n log n)).
* ``gpt2`` — byte-level BPE (Qwen3 ``pre=qwen2``, Qwen3.5 ``pre=qwen35``): ``llm_tokenizer_bpe_session``. The regex
  pre-split, GPT-2 byte-to-unicode mapping and rank-ordered merges run in the ``tokenizers`` library (Rust).
* ``gemma4`` — BPE over raw UTF-8 characters (Gemma 4): ' ' -> '▁', split into newline / non-newline runs, merges
  by rank in ``tokenizers``, ``<0xXX>`` byte fallback; a newline run that is a token is taken whole.

Before either, the text is partitioned on the literal text of special tokens exactly as ``tokenizer_st_partition``
does: every CONTROL / USER_DEFINED / UNKNOWN token, longest (in UTF-8 bytes) first; CONTROL and UNKNOWN only when
``parse_special``. Gemma 3's USER_DEFINED tokens include runs of spaces, tabs and newlines, so those are always
split out before SPM sees the text.

Decoding follows ``token_to_piece``: NORMAL pieces are un-escaped ('▁' -> ' ') or byte-level decoded, BYTE tokens give
their byte, CONTROL/UNKNOWN give their text unless skipped, USER_DEFINED always give their text, UNUSED give nothing.
"""

from __future__ import annotations

import heapq
import os
import re
from collections.abc import Iterable, Mapping

from .errors import GGUFError

# llama.cpp token types (gguf ``tokenizer.ggml.token_type``)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Texts that llama.cpp puts into the end-of-generation set (llama-vocab.cpp, "maintain a list of tokens that cause
# end-of-generation"), besides eos/eot/eom ids from metadata.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
    "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
    "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
})
# FIM tokens llama.cpp auto-detects by text when metadata has no id; pad/rep/sep join the end-of-generation set.
_FIM_TEXTS = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>", "<|code_prefix|>",
            "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>",
            "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>",
            "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}
# Texts llama.cpp auto-detects as the EOT token when metadata has no eot_token_id.
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
              "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")

# Pre-tokenizer regexes, verbatim from llama-vocab.cpp (llm_tokenizer_bpe constructor). llama.cpp runs them through
# hand-written equivalents (unicode.cpp unicode_regex_split_custom_qwen2/qwen35). The `tokenizers` (Oniguruma) regex
# gives the same splits, unassigned code points and \x1c-\x1f / U+0085 / U+3000 whitespace included (tests/tokenizer:
# hypothesis fuzz against a line-by-line port of the custom splitter, and llama-tokenize fixtures). Unicode table
# versions differ (llama.cpp's unicode-data.cpp is Unicode 15), so code points assigned later may split differently.
QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_PRE_REGEX = {"qwen2": QWEN2_REGEX, "deepseek-r1-qwen": QWEN2_REGEX, "qwen35": QWEN35_REGEX}

SPM_SPACE = "\u2581"  # '▁'
_NEWLINE_RUNS = re.compile(r"[^\n]+|\n+")


def gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (same table as llama.cpp unicode_byte_to_utf8)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _strip_thinking(text: str) -> str:
    """gemma4.jinja strip_thinking: drop every ``<|channel>…<channel|>`` span."""
    out = []
    for part in text.split("<channel|>"):
        out.append(part.split("<|channel>")[0] if "<|channel>" in part else part)
    return "".join(out)


def _chat_family_of_template(template: str) -> str | None:
    """The turn format of a Jinja chat template, by its markers (src/llama-chat.cpp ``llm_chat_detect_template``
    order for the ones it knows): 'gemma4', 'chatml', 'gemma', or None for a format we do not render."""
    if "<|turn>" in template:
        return "gemma4"
    if "<|im_start|>" in template:
        # llama.cpp: <|im_sep|> is Phi-4, <end_of_utterance> SmolVLM; neither is ChatML
        return None if ("<|im_sep|>" in template or "<end_of_utterance>" in template) else "chatml"
    if "<start_of_turn>" in template:
        return "gemma"
    return None


# ----------------------------------------------------------------------------------------------- streaming decode
class StreamDecoder:
    """Decodes one token id at a time; ``push`` returns only complete UTF-8 text and holds back a partial sequence
    (an emoji split over several ``<0xXX>`` byte tokens), ``flush`` returns what is left (invalid bytes as U+FFFD).

    The concatenation of all ``push`` results plus ``flush()`` equals ``Tokenizer.decode`` of the same ids.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip = skip_special
        self._pending = b""

    def push(self, token_id: int) -> str:
        data = self._pending + self._tok._piece(int(token_id), self._skip)
        if not data:
            return ""
        # keep back an incomplete UTF-8 sequence at the end (at most 3 bytes); everything before it decodes now
        cut = len(data)
        for back in range(1, min(4, len(data)) + 1):
            b = data[-back]
            if b & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
                continue
            need = 1 if b < 0x80 else 2 if b >> 5 == 0b110 else 3 if b >> 4 == 0b1110 else 4 if b >> 3 == 0b11110 else 1
            if need > back:
                cut = len(data) - back
            break
        self._pending = data[cut:]
        return data[:cut].decode("utf-8", "replace")

    def flush(self) -> str:
        data, self._pending = self._pending, b""
        return data.decode("utf-8", "replace")


# ----------------------------------------------------------------------------------------------- the tokenizer
class Tokenizer:
    """llama.cpp-exact tokenizer for ``tokenizer.ggml.model`` in {``llama`` (SPM), ``gpt2`` (byte-level BPE, pre
    ``qwen2``/``qwen35``), ``gemma4`` (raw-UTF-8 BPE)}. Build with :meth:`from_gguf`.

    ``encode(text, add_bos=None, parse_special=True)`` behaves as ``llama_tokenize(text, add_special, parse_special)``
    (``add_bos=None`` follows the model's ``add_bos_token``); ``decode``/``token_bytes``/``stream_decoder`` follow
    ``token_to_piece``; ``eog_ids`` is llama.cpp's end-of-generation set.
    """

    def __init__(self, metadata: Mapping, source: str = "<metadata>"):
        md = metadata
        self.source = source

        def need(key):
            if key not in md:
                raise GGUFError(source, f"missing tokenizer metadata key {key!r}")
            return md[key]

        self.model: str = need("tokenizer.ggml.model")
        self.pre: str = md.get("tokenizer.ggml.pre", "default")
        if self.model not in ("llama", "gpt2", "gemma4"):
            raise GGUFError(source, f"unsupported tokenizer model {self.model!r} (supported: 'llama' SPM as in "
                                    f"Gemma 3, 'gpt2' byte-level BPE as in Qwen3/Qwen3.5, 'gemma4' BPE as in Gemma 4)")
        if self.model == "gemma4":
            self.pre = "gemma4"  # llama.cpp forces this pre-tokenizer for the gemma4 tokenizer model
        if self.model == "gpt2" and self.pre not in BPE_PRE_REGEX:
            raise GGUFError(source, f"unsupported BPE pre-tokenizer {self.pre!r} (supported: "
                                    f"{', '.join(sorted(BPE_PRE_REGEX))})")
        tokens = need("tokenizer.ggml.tokens")
        n = len(tokens)
        if n == 0:
            raise GGUFError(source, "empty vocabulary (tokenizer.ggml.tokens)")
        types = md.get("tokenizer.ggml.token_type") or [NORMAL] * n
        if len(types) < n:
            raise GGUFError(source, f"tokenizer.ggml.token_type has {len(types)} entries < {n} tokens")
        # llama.cpp replaces empty token texts with "[EMPTY_<i>]"; later duplicates win in token_to_id
        tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.vocab_size = n
        self._tokens: list[str] = tokens
        self._types: list[int] = list(types[:n])
        self._token_to_id: dict[str, int] = dict(zip(tokens, range(n)))

        # special ids (llama.cpp defaults: SPM bos 1 eos 2 unk 0; BPE bos/eos 11 — only used if the keys are absent)
        spm = self.model == "llama"
        gemma4 = self.model == "gemma4"
        # ' ' -> '▁' before tokenizing and back when decoding (SPM, and Gemma 4's SPM-style BPE)
        self._escape_spaces = spm or gemma4
        default_bos, default_eos = (1, 2) if spm else (None, None) if gemma4 else (11, 11)

        def special_id(key, default):
            v = md.get(key, default)
            return int(v) if v is not None and 0 <= int(v) < n else None

        self.bos_id = special_id("tokenizer.ggml.bos_token_id", default_bos)
        self.eos_id = special_id("tokenizer.ggml.eos_token_id", default_eos)
        self.unk_id = special_id("tokenizer.ggml.unknown_token_id", 0 if spm else None)
        self.pad_id = special_id("tokenizer.ggml.padding_token_id", None)
        eot_id = special_id("tokenizer.ggml.eot_token_id", None)
        eom_id = special_id("tokenizer.ggml.eom_token_id", None)
        # llama.cpp forces add_bos for Gemma 4 whatever the file says (llama-vocab.cpp, PR 21500)
        self.add_bos: bool = bool(md.get("tokenizer.ggml.add_bos_token", spm)) or gemma4
        self.add_eos: bool = bool(md.get("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix: bool = bool(md.get("tokenizer.ggml.add_space_prefix", spm))
        self.chat_template: str | None = md.get("tokenizer.chat_template")

        # EOT auto-detection and "control-looking" tokens forced to CONTROL (llama-vocab.cpp load())
        if eot_id is None:
            for t in _EOT_TEXTS:
                if t in self._token_to_id:
                    eot_id = self._token_to_id[t]
                    break
        fim = {}
        for kind, texts in _FIM_TEXTS.items():
            fim[kind] = special_id(f"tokenizer.ggml.fim_{kind}_token_id", None)
            if fim[kind] is None:
                fim[kind] = next((self._token_to_id[t] for t in texts if t in self._token_to_id), None)
        eog = {i for t in _EOG_TEXTS if (i := self._token_to_id.get(t)) is not None}
        for i in (self.eos_id, eot_id, eom_id, fim["pad"], fim["rep"], fim["sep"]):
            if i is not None:
                eog.add(i)
        for i in eog | {i for i in (eot_id, *fim.values()) if i is not None}:
            if self._types[i] not in (CONTROL, USER_DEFINED, UNKNOWN):
                self._types[i] = CONTROL
        # Gemma 4 has a normal "</s>": with "<|tool_response>" present llama.cpp drops "</s>" from EOG
        s_id = self._token_to_id.get("</s>")
        if s_id in eog and "<|tool_response>" in self._token_to_id:
            eog.discard(s_id)
            self._types[s_id] = NORMAL
        self.eot_id = eot_id
        self.eog_ids: frozenset[int] = frozenset(eog)

        # special-token partition order: longest UTF-8 text first (llama.cpp sorts cache_special_tokens by size)
        special = [i for i, ty in enumerate(self._types) if ty in (CONTROL, USER_DEFINED, UNKNOWN)]
        special.sort(key=lambda i: -len(tokens[i].encode("utf-8")))
        self._special_all = [(tokens[i], i) for i in special]
        self._special_user = [(tokens[i], i) for i in special if self._types[i] == USER_DEFINED]

        # byte pieces per id (token_to_piece with special=true), built lazily for large vocabularies
        self._piece_cache: dict[int, bytes] = {}
        if gemma4:
            self._hf = self._build_hf_bpe(md, source, byte_level=False)
        elif spm:
            scores = md.get("tokenizer.ggml.scores") or [0.0] * n
            self._scores: list[float] = scores
            hexd = "0123456789ABCDEF"
            self._byte_ids = []
            for b in range(256):
                i = self._token_to_id.get(f"<0x{hexd[b >> 4]}{hexd[b & 15]}>")
                if i is None:
                    i = self._token_to_id.get(chr(b)) if b < 128 else None
                self._byte_ids.append(i)
        else:
            self._byte_decoder = {c: b for b, c in gpt2_bytes_to_unicode().items()}
            self._hf = self._build_hf_bpe(md, source, byte_level=True)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_gguf(cls, g) -> Tokenizer:
        """From a :class:`sparkinfer_cute.gguf.GGUFFile` (its ``metadata``), or from a path to a GGUF file."""
        if isinstance(g, (str, os.PathLike)):
            from .gguf import GGUFFile

            g = GGUFFile(g)
        return cls(g.metadata, source=getattr(g, "path", "<gguf>"))

    def _build_hf_bpe(self, md: Mapping, source: str, byte_level: bool):
        from tokenizers import Regex, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        merges_raw = md.get("tokenizer.ggml.merges")
        if not merges_raw:
            raise GGUFError(source, "BPE tokenizer without tokenizer.ggml.merges")
        # llama.cpp splits each merge at the first space after position 0 (a byte-level vocab has no literal spaces,
        # so the plain split is the same; the slow path only runs for a merge that starts with a space)
        merges = [tuple(m.split(" ", 1)) if m[:1] != " " else (m[: m.find(" ", 1)], m[m.find(" ", 1) + 1 :])
                  for m in merges_raw]
        bad = next((m for m, pair in zip(merges_raw, merges) if len(pair) != 2 or not pair[0]), None)
        if bad is not None:
            raise GGUFError(source, f"malformed BPE merge {bad!r}")
        # only NORMAL / BYTE pieces are merge targets; special texts are never produced by BPE in practice but keeping
        # the whole vocab makes ids identical to llama.cpp's text_to_token
        vocab = dict(self._token_to_id)
        if not byte_level:
            # Gemma 4: merges over raw UTF-8 characters, no pre-split here (encode splits on newline runs), and
            # characters outside the vocab become <0xXX> tokens (HF byte_fallback == llama.cpp's fallback loop)
            return HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=True))
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(BPE_PRE_REGEX[self.pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        return hf

    # ------------------------------------------------------------------ encode
    def _partition(self, text: str, parse_special: bool) -> list:
        """tokenizer_st_partition: a list of str fragments and int special ids, in order."""
        frags: list = [text]
        for tok_text, tid in self._special_all if parse_special else self._special_user:
            if tok_text not in text:
                continue
            out = []
            for fr in frags:
                if isinstance(fr, int) or tok_text not in fr:
                    out.append(fr)
                    continue
                parts = fr.split(tok_text)
                for j, p in enumerate(parts):
                    if j:
                        out.append(tid)
                    if p:
                        out.append(p)
            frags = out
        return frags

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``, as ``llama_tokenize(text, add_special=add_bos, parse_special)``.

        ``add_bos=None`` follows the model (``tokenizer.ggml.add_bos_token``); EOS is appended only if the model's
        ``add_eos_token`` is set and BOS/EOS are requested (llama.cpp ties both to ``add_special``).
        """
        add_special = self.add_bos if add_bos is None else bool(add_bos)
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        frags = self._partition(text, parse_special) if text else []
        if self.model == "llama":
            prev_special = True
            for fr in frags:
                if isinstance(fr, int):
                    out.append(fr)
                    prev_special = True
                else:
                    if self.add_space_prefix and prev_special:
                        fr = " " + fr
                    self._spm_tokenize(fr.replace(" ", SPM_SPACE), out)
                    prev_special = False
        elif self.model == "gemma4":
            tok = self._token_to_id
            for fr in frags:
                if isinstance(fr, int):
                    out.append(fr)
                    continue
                # unicode_regex_split_custom_newlines: runs of '\n' and runs of everything else; a run of newlines
                # that is itself a token is emitted whole (llm_tokenizer_bpe_session, gemma 4 fix, PR 21343)
                for word in _NEWLINE_RUNS.findall(fr.replace(" ", SPM_SPACE)):
                    if word[0] == "\n" and word in tok:
                        out.append(tok[word])
                    else:
                        out.extend(self._hf.encode(word, add_special_tokens=False).ids)
        else:
            for fr in frags:
                if isinstance(fr, int):
                    out.append(fr)
                else:
                    out.extend(self._hf.encode(fr, add_special_tokens=False).ids)
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _spm_tokenize(self, text: str, out: list[int]) -> None:
        """llm_tokenizer_spm_session::tokenize on one fragment (already '▁'-escaped)."""
        n = len(text)
        if n == 0:
            return
        tok = self._token_to_id
        scores = self._scores
        sym_text = list(text)  # one UTF-8 character per symbol; merged symbols hold the concatenation
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list = []
        push = heapq.heappush
        # heap entry: (-score, left, right, merged_text); max score first, then the leftmost pair (llm_bigram_spm)
        for i in range(n - 1):
            t = sym_text[i] + sym_text[i + 1]
            tid = tok.get(t)
            if tid is not None:
                push(heap, (-scores[tid], i, i + 1, t))
        pop = heapq.heappop
        while heap:
            _, left, right, t = pop(heap)
            lt, rt = sym_text[left], sym_text[right]
            # stale if either side was merged away or grew since the bigram was queued
            if not lt or not rt or len(lt) + len(rt) != len(t):
                continue
            sym_text[left] = t
            sym_text[right] = ""
            r_next = nxt[right]
            nxt[left] = r_next
            if r_next >= 0:
                prv[r_next] = left
            p = prv[left]
            if p >= 0:
                t2 = sym_text[p] + t
                tid = tok.get(t2)
                if tid is not None:
                    push(heap, (-scores[tid], p, left, t2))
            if r_next >= 0:
                t2 = t + sym_text[r_next]
                tid = tok.get(t2)
                if tid is not None:
                    push(heap, (-scores[tid], left, r_next, t2))
        i = 0
        byte_ids = self._byte_ids
        while i != -1:
            t = sym_text[i]
            tid = tok.get(t)
            if tid is not None:
                out.append(tid)
            else:  # resegment: a lone character not in the vocab -> its UTF-8 bytes as <0xXX> tokens
                for b in t.encode("utf-8"):
                    bid = byte_ids[b]
                    if bid is None:
                        raise GGUFError(self.source, f"SPM vocabulary has no byte token for 0x{b:02X}")
                    out.append(bid)
            i = nxt[i]

    # ------------------------------------------------------------------ decode
    def _piece(self, tid: int, skip_special: bool) -> bytes:
        ty = self._types[tid]
        if skip_special and ty in (CONTROL, UNKNOWN):
            return b""
        p = self._piece_cache.get(tid)
        if p is None:
            p = self._make_piece(tid)
            self._piece_cache[tid] = p
        return p

    def _make_piece(self, tid: int) -> bytes:
        text = self._tokens[tid]
        ty = self._types[tid]
        if ty in (CONTROL, UNKNOWN, USER_DEFINED):
            return text.encode("utf-8")
        if ty == NORMAL:
            if self._escape_spaces:
                return text.replace(SPM_SPACE, " ").encode("utf-8")
            dec = self._byte_decoder
            return bytes(dec[c] for c in text) if all(c in dec for c in text) else text.encode("utf-8")
        if ty == BYTE:
            return bytes([int(text[3:5], 16)])
        return b""  # UNUSED / undefined types render as nothing (token_to_piece falls through)

    def token_bytes(self, id: int) -> bytes:
        """Raw bytes of one token's piece (special tokens give their text)."""
        if not 0 <= int(id) < self.vocab_size:
            raise IndexError(f"token id {id} out of range [0, {self.vocab_size})")
        return self._piece(int(id), False)

    def token_text(self, id: int) -> str:
        """The vocabulary string of a token (as stored in the GGUF, e.g. '▁the', '<0x0A>', 'Ġthe')."""
        return self._tokens[int(id)]

    def token_type(self, id: int) -> int:
        return self._types[int(id)]

    def token_to_id(self, text: str) -> int | None:
        return self._token_to_id.get(text)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``: the concatenated piece bytes decoded as UTF-8 (invalid bytes -> U+FFFD).

        With ``skip_special`` CONTROL and UNKNOWN tokens (BOS, ``<end_of_turn>``, ...) render as nothing."""
        n = self.vocab_size
        parts = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise IndexError(f"token id {i} out of range [0, {n})")
            parts.append(self._piece(i, skip_special))
        return b"".join(parts).decode("utf-8", "replace")

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    # ------------------------------------------------------------------ chat templates
    @property
    def chat_family(self) -> str:
        """'gemma' (Gemma 3 turns), 'gemma4' (Gemma 4 turns), 'qwen3' (ChatML + Qwen3 thinking switch) or 'qwen35'
        (ChatML, Qwen3.5).

        From the GGUF's ``tokenizer.chat_template`` when the file has one, recognised by its turn markers as
        llama.cpp's ``llm_chat_detect_template`` does (src/llama-chat.cpp: ``<|im_start|>`` is ChatML, checked before
        ``<start_of_turn>``, Gemma; Gemma 4's ``<|turn>`` goes through llama.cpp's Jinja engine, so it is checked
        first here). ChatML is Qwen3.5's flavour when the vocabulary's pre-tokenizer is ``qwen35``. A template we do
        not render (Llama 3, Mistral, ...) is a :class:`GGUFError`. Without a template (base models such as the
        packaged Gemma 3 270M) the family is guessed from the turn-marker tokens of the vocabulary
        (:attr:`chat_template_guessed` says so)."""
        fam = _chat_family_of_template(self.chat_template) if self.chat_template else None
        if self.chat_template and fam is None:
            raise GGUFError(self.source, "tokenizer.chat_template is not a format we render (supported: Gemma 3, "
                                         "Gemma 4, ChatML as Qwen3 / Qwen3.5 use it)")
        if fam is None:
            if self.model == "gemma4" or "<|turn>" in self._token_to_id:
                fam = "gemma4"
            elif "<start_of_turn>" in self._token_to_id:
                fam = "gemma"
            elif "<|im_start|>" in self._token_to_id:
                fam = "chatml"
            else:
                raise GGUFError(self.source, "no chat template in the file and no known turn markers in the "
                                             "vocabulary (neither <start_of_turn>, <|turn> nor <|im_start|>)")
        if fam == "chatml":
            return "qwen35" if self.pre == "qwen35" else "qwen3"
        return fam

    @property
    def chat_template_guessed(self) -> bool:
        """True when the file has no ``tokenizer.chat_template`` (the turn format is guessed from the vocabulary)."""
        return not self.chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *,
                            enable_thinking: bool = False) -> str:
        """The prompt text for ``messages`` ([{"role": "system"|"user"|"assistant", "content": str}, ...]).

        The text carries no BOS: ``encode`` adds it when the model wants one (llama.cpp strips a template's leading
        BOS for the same reason), so ``encode(apply_chat_template(m))`` starts with exactly one BOS.

        * Gemma 3 (llama.cpp LLM_CHAT_TEMPLATE_GEMMA / HF template): system content (trimmed) is prepended to the
          first user turn followed by a blank line; "assistant" is renamed "model"; contents are trimmed;
          ``<start_of_turn>{role}\\n{content}<end_of_turn>\\n`` per turn, then ``<start_of_turn>model\\n``.
        * Gemma 4 (llama.cpp models/templates/gemma4.jinja, text only): a leading system message becomes
          ``<|turn>system\n{content|trim}<turn|>\n`` (thinking on: ``<|think|>`` first, and the system turn is
          opened even without a system message); turns ``<|turn>{role}\n{content|trim}<turn|>\n`` with "assistant"
          renamed "model" and its ``<|channel>…<channel|>`` thoughts stripped; then ``<|turn>model\n``, followed by
          an empty thought channel ``<|channel>thought\n<channel|>`` when thinking is off.
        * Qwen3 / Qwen3.5 ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn (an assistant turn before
          the last user turn loses its ``<think>…</think>`` reasoning, as the Qwen3 templates drop it), then
          ``<|im_start|>assistant\\n``; with thinking disabled the generation prompt is followed by an empty
          ``<think>\\n\\n</think>\\n\\n`` block (Qwen3.5 opens ``<think>\\n`` when thinking is enabled).
        """
        fam = self.chat_family
        parts: list[str] = []
        if fam == "gemma":
            system = ""
            for m in messages:
                role, content = m["role"], m.get("content") or ""
                if role == "system":
                    system += content.strip()
                    continue
                role = "model" if role == "assistant" else role
                parts.append(f"<start_of_turn>{role}\n")
                if system and role != "model":
                    parts.append(system + "\n\n")
                    system = ""
                parts.append(content.strip() + "<end_of_turn>\n")
            if add_generation_prompt:
                parts.append("<start_of_turn>model\n")
            return "".join(parts)
        if fam == "gemma4":
            msgs = list(messages)
            if enable_thinking or (msgs and msgs[0]["role"] in ("system", "developer")):
                parts.append("<|turn>system\n")
                if enable_thinking:
                    parts.append("<|think|>")
                if msgs and msgs[0]["role"] in ("system", "developer"):
                    parts.append((msgs.pop(0).get("content") or "").strip())
                parts.append("<turn|>\n")
            for m in msgs:
                role = "model" if m["role"] == "assistant" else m["role"]
                content = m.get("content") or ""
                if role == "model":
                    content = _strip_thinking(content)
                parts.append(f"<|turn>{role}\n{content.strip()}<turn|>\n")
            if add_generation_prompt:
                parts.append("<|turn>model\n")
                if not enable_thinking:
                    parts.append("<|channel>thought\n<channel|>")
            return "".join(parts)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
        for i, m in enumerate(messages):
            content = m.get("content") or ""
            if m["role"] == "assistant" and i < last_user and "</think>" in content:
                content = content.split("</think>")[-1].lstrip("\n")  # earlier turns' reasoning is dropped
            parts.append(f"<|im_start|>{m['role']}\n{content}<|im_end|>\n")
        if add_generation_prompt:
            parts.append("<|im_start|>assistant\n")
            if not enable_thinking:
                parts.append("<think>\n\n</think>\n\n")
            elif fam == "qwen35":
                parts.append("<think>\n")
        return "".join(parts)

    def __repr__(self) -> str:
        return (f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, "
                f"eos={self.eos_id}, add_bos={self.add_bos})")
