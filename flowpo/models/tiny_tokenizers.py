"""Small tokenizers trained in code (no download) for the tiny models and tiny rewards.

CLIP (byte-level BPE), T5 (Unigram) and Qwen2 (byte-level BPE) tokenizers over one word list,
with merges replayed under a fixed tie-break so that every process builds the same vocabulary.
"""

from __future__ import annotations

import json
from typing import Any

# Words the tiny tokenizers know as whole tokens: COCO classes (GenEval objects), colours,
# shapes, counts, spatial relations and common caption words. Anything else still tokenizes
# (CLIP falls back to bytes, T5 to characters), only into more pieces.
WORDS = """
a an the of and or with without in on at to from by for is are this that these those there
photo picture image painting drawing render illustration sketch close up view scene background
one two three four five six seven eight nine ten eleven twelve zero many few several some no
0 1 2 3 4 5 6 7 8 9 single pair couple group lot number count
red orange yellow green blue purple pink brown black white gray grey gold silver beige cyan
magenta dark light bright pale colorful colourful striped dotted plain shiny
circle square triangle rectangle star heart hexagon oval diamond cube sphere cone cylinder
pyramid ring line dot shape shapes
left right above below under over next beside behind front top bottom middle center near far
inside outside between side
person people man woman boy girl child baby bicycle car motorcycle airplane bus train truck
boat traffic light fire hydrant stop sign parking meter bench bird cat dog horse sheep cow
elephant bear zebra giraffe backpack umbrella handbag tie suitcase frisbee skis snowboard
sports ball kite baseball bat glove skateboard surfboard tennis racket bottle wine glass cup
fork knife spoon bowl banana apple sandwich orange broccoli carrot hot pizza donut cake chair
couch potted plant bed dining table toilet tv laptop mouse remote keyboard cell phone
microwave oven toaster sink refrigerator book clock vase scissors teddy hair drier toothbrush
big small large tiny huge little tall short long round flat old new young happy sad cute
beautiful simple detailed realistic cartoon style art high quality sharp blurry empty full
sky sun moon cloud water sea river lake mountain tree flower grass forest city street road
house building room window door wall floor field beach snow rain night day morning evening
sitting standing running walking flying holding wearing eating playing looking lying
text word letter says reads written sign poster board paper hello world
""".split()


def clip_tokenizer(model_max_length: int) -> Any:
    """A byte-level BPE CLIP tokenizer trained on `WORDS` (~900 tokens)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok = Tokenizer(
        models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix="", unk_token=eos)
    )
    # same normaliser and pre-tokeniser as CLIPTokenizer, so the learned merges apply as trained
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    split = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        special_tokens=[bos, eos],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    # The trainer breaks frequency ties in hash order, so ids and merge order change from
    # process to process (same sets): replay its merges with a fixed tie-break instead.
    merges = replay_merges(tok.pre_tokenizer, " ".join(WORDS), set(merges))
    vocab: dict[str, int] = {bos: 0, eos: 1}
    learned = sorted(model["vocab"], key=lambda t: (len(t), t))
    for piece in [p for p in learned if len(p) == 1] + [a + b for a, b in merges] + learned:
        vocab.setdefault(piece, len(vocab))
    # every byte alone and at a word end, so no input ever maps to the unknown token
    for ch in sorted(alphabet):
        for piece in (ch, ch + "</w>"):
            vocab.setdefault(piece, len(vocab))
    # transformers 5: vocab=/merges= objects (a vocab_file= argument would be silently ignored)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def replay_merges(
    pre_tokenizer: Any,
    text: str,
    allowed: set[tuple[str, str]] | None = None,
    suffix: str = "</w>",
) -> list:
    """BPE training restricted to `allowed` merges (None: any pair): repeatedly merge the most
    frequent pair (ties: the smallest pair), so the merge order is the same in every process.
    `suffix` marks a word's last symbol (CLIP's "</w>"; "" for byte-level BPE without one)."""
    from collections import Counter

    counts = Counter(piece for piece, _ in pre_tokenizer.pre_tokenize_str(text))
    words = {w: [*w[:-1], w[-1] + suffix] for w in counts}
    order = []
    while True:
        pairs: Counter = Counter()
        for w, syms in words.items():
            for pair in zip(syms, syms[1:]):
                if allowed is None or pair in allowed:
                    pairs[pair] += counts[w]
        if not pairs:
            return order
        best = min(pairs, key=lambda p: (-pairs[p], p))
        order.append(best)
        for w, syms in words.items():
            i, out = 0, []
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            words[w] = out


def t5_tokenizer(model_max_length: int) -> Any:
    """A Unigram T5 tokenizer: one piece per word in `WORDS`, characters as the fallback."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -5.0) for w in dict.fromkeys(WORDS)]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()&/"
    known = {p for p, _ in pieces}
    # characters score far below words so a known word is always one token
    pieces += [(c, -10.0) for c in chars if c not in known]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def qwen_tokenizer() -> Any:
    """A byte-level BPE Qwen2 tokenizer learned on `WORDS` and Qwen-Image's prompt template,
    with the <|im_start|>/<|im_end|> specials: like the real one it splits the template's
    system/user prefix into exactly 34 tokens (the count the pipeline drops)."""
    from tokenizers import AddedToken, Regex, pre_tokenizers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from flowpo.models.qwen_image import PROMPT_TEMPLATE

    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    text = PROMPT_TEMPLATE.format(" " + " ".join(WORDS))
    for sp in specials:
        text = text.replace(sp, "\n")
    merges = replay_merges(pre, text, suffix="")  # every word of the text becomes one token
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for sp in specials:
        vocab[sp] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tok.add_tokens([AddedToken(sp, special=True) for sp in specials[1:]])
    return tok
