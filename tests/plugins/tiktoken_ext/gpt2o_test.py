"""A small tiktoken encoding for offline tests, registered the way tiktoken finds every encoding: a module of the
`tiktoken_ext` namespace package that exposes ENCODING_CONSTRUCTORS. With tests/plugins on sys.path (conftest.py
puts it there, and on PYTHONPATH for the scripts the tests run), `tiktoken.get_encoding("gpt2o_test")` runs
tiktoken's real code with no download.

Its BPE is built like GPT-2's, only smaller: the 256 bytes, then merges of the most frequent adjacent pair in
CORPUS (split with GPT-2's pattern), then <|endoftext|> as its one special token, like GPT-2's.
"""
from collections import Counter

import regex

# GPT-2's split pattern, as tiktoken_ext/openai_public.py writes it
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
N_MERGES = 200
CORPUS = """To Sherlock Holmes she is always the woman. I have seldom heard him mention her under any other name.
In his eyes she eclipses and predominates the whole of her sex. It was not that he felt any emotion akin to love
for Irene Adler. All emotions, and that one particularly, were abhorrent to his cold, precise but admirably
balanced mind. He was, I take it, the most perfect reasoning and observing machine that the world has seen.
It is a capital mistake to theorize before one has data. Insensibly one begins to twist facts to suit theories,
instead of theories to suit facts. You see, but you do not observe. The distinction is clear."""


def _mergeable_ranks() -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(tuple(bytes([b]) for b in w.encode()) for w in regex.findall(PAT_STR, CORPUS))
    while len(ranks) < 256 + N_MERGES:
        pairs = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # ties broken by the bytes: the same ranks every time
        ranks.setdefault(best[0] + best[1], len(ranks))
        merged = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    return ranks


def gpt2o_test() -> dict:
    ranks = _mergeable_ranks()
    return {"name": "gpt2o_test", "pat_str": PAT_STR, "mergeable_ranks": ranks,
            "special_tokens": {"<|endoftext|>": len(ranks)}}


ENCODING_CONSTRUCTORS = {"gpt2o_test": gpt2o_test}


def gpt2o_test_unreachable() -> dict:
    """An encoding whose BPE file must be downloaded from a server that is not there: tiktoken's own download and
    cache code runs and fails, as it does for "gpt2" on a machine without internet."""
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe("http://127.0.0.1:9/gpt2o_test.tiktoken")
    return {"name": "gpt2o_test_unreachable", "pat_str": PAT_STR, "mergeable_ranks": ranks, "special_tokens": {}}


ENCODING_CONSTRUCTORS["gpt2o_test_unreachable"] = gpt2o_test_unreachable


BIG_VOCAB = 70_000  # more ids than uint16 holds, as cl100k_base (100k) and o200k_base (200k) have


def gpt2o_test_big() -> dict:
    """gpt2o_test's BPE padded with tokens no merge can reach (two bytes no rank joins, then a counter) to
    BIG_VOCAB ids, then <|endoftext|>: a vocabulary whose ids do not fit uint16 shards, built offline."""
    ranks = _mergeable_ranks()
    for i in range(BIG_VOCAB - len(ranks)):
        ranks[b"\xff\xfe" + i.to_bytes(3, "big")] = len(ranks)
    return {"name": "gpt2o_test_big", "pat_str": PAT_STR, "mergeable_ranks": ranks,
            "special_tokens": {"<|endoftext|>": len(ranks)}}


ENCODING_CONSTRUCTORS["gpt2o_test_big"] = gpt2o_test_big
