"""Multilingual test corpus shared by the fixture script and the tests (keep in sync with the committed fixtures:
changing a text here makes test_tokenizer report the fixture as stale)."""

CORPUS: list[str] = [
    "",
    "Hello world",
    " Hello  world   with   irregular    spaces ",
    "   leading spaces and trailing ones   ",
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it? I'LL say we've 42 cats'd...",
    'def fib(n):\n\tif n < 2:\n\t\treturn n\n\treturn fib(n - 1) + fib(n - 2)\n\n\nclass A:\n    """doc"""\n    x = {"k": [1, 2, 3]}\n',
    "line1\nline2\r\nline3\n\n\n\nline4\t\ttabbed  \n   \n",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "مرحبا بالعالم! هذا نص عربي مع أرقام ١٢٣ و 456.",
    "Emoji: 😀👍🏽 family 👨‍👩‍👧‍👦 flag 🇯🇵 heart ❤️ rare 🫠🪿",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after a literal bos <eos> and <pad> and <unk>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    "Byte fallback: \u0000\u0001\u001f\u007f \U000e0041 \U0010fffd \u2028 \ufeff end",
    "Mixed scripts: café naïve résumé Ελληνικά עברית हिन्दी ไทย ግዕዝ",
    "Combining marks: e\u0301 a\u0308 \u0915\u094d\u0937 Z\u0351\u0356\u0339a\u0360l\u0353g\u0315o",
    "Unicode spaces:\u00a0nbsp\u3000ideographic\u2009thin\u0085nel\u000bvt\u000cff\u001cfs end",
    "numbers 1234567890 ١٢٣ Ⅻⅻ ½ and 3rd 21st 1,000,000.00",
    "    \n\t\n  x",
    "a" * 300 + " " + "ab" * 100,
    "'s 'S 're 'RE 've 'm 'll 'd 'x ''",
]


def _soup(seed: int, n: int) -> str:
    """Deterministic random mix of ASCII, Latin, combining marks, general punctuation, unassigned and private-use
    code points, emoji parts and odd whitespace: splitter and byte-fallback edge cases in one string."""
    import random

    rng = random.Random(seed)
    pool = [chr(c) for c in [*range(0x20, 0x7F), *range(0xA0, 0x250), *range(0x300, 0x370), *range(0x2000, 0x2070)]]
    pool += [chr(c) for c in (0x378, 0x2FFFE, 0xE000, 0xF8FF, 0x10FFFD, 0x1C, 0x1F, 0x85, 0x3000, 0x180E, 0x1F600,
                              0x1F3FD, 0x200D, 0x4E00, 0x0915, 0x094D, 0x0660, 0xFEFF, 0xE0041)]
    pool += list(" \n\r\t'sSreRElLdDvm") * 4
    return "".join(rng.choice(pool) for _ in range(n))


CORPUS += [_soup(1, 200), _soup(2, 200)]
