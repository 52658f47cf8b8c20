"""Character-level tokenizer for the embedded task suite, as a Hugging Face `tokenizer.json`.

One token per printable ASCII character plus four special tokens at fixed ids:
    0 <pad>   1 <bos>   2 <eos>   3 <unk>   4.. " " (0x20) to "~" (0x7E)
Every encoding starts with <bos> (a TemplateProcessing post-processor, so any loader of the saved
files, not only this module, gets the same ids). Decoding fuses the characters back without added
spaces, so `decode(encode(s), skip_special_tokens=True) == s` for any printable ASCII string that
does not itself contain a special-token literal such as "<eos>".

Contract with scoring (see batch.py): the model input is the prompt as this tokenizer encodes it
(<bos> included); the scored target is the answer's tokens followed by <eos>.
"""

from __future__ import annotations

import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
ALPHABET = "".join(chr(c) for c in range(0x20, 0x7F))
VOCAB_SIZE = len(SPECIAL_TOKENS) + len(ALPHABET)


def _build_core() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Every character (spaces included) is its own pre-token; WordLevel then maps it to one id, and
    # any character outside ALPHABET becomes <unk> instead of being dropped.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B:1",
        special_tokens=[(BOS, BOS_ID)],
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The character-level tokenizer as a transformers fast tokenizer (vocab size VOCAB_SIZE)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_build_core(),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="right",
        # The default clean-up would turn "a ." into "a." and break the round trip.
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(out_dir: str | os.PathLike) -> str:
    """Write tokenizer.json and tokenizer_config.json into `out_dir` (created if missing).

    The files load with `transformers.AutoTokenizer.from_pretrained(out_dir)`.

    Returns:
      out_dir as a string.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    build_tokenizer().save_pretrained(out_dir)
    # transformers 5 records its own backend class name, which transformers 4 cannot resolve;
    # "PreTrainedTokenizerFast" is understood by both.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    cfg["model_max_length"] = 1024
    tmp = cfg_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, cfg_path)
    return out_dir
