"""Our trained tokenizer (HF `tokenizers` JSON, datamodules/tokenizers.py) -> a transformers fast tokenizer with
its special-token roles set, so that `AutoTokenizer.from_pretrained(dir)` of an exported text encoder encodes
text exactly as training did and knows its pad / mask / cls / sep / unk / bos / eos tokens.

    byte-level BPE (RoBERTa layout)   <s> = bos = cls, </s> = eos = sep, <pad>, <unk>, <mask> (lstrip, as RoBERTa:
                                      "a <mask>" puts the mask where " word" would be)
    WordPiece (BERT layout)           [CLS] = cls = bos, [SEP] = sep = eos, [PAD], [UNK], [MASK]

`save_pretrained` writes tokenizer.json and tokenizer_config.json (the roles, model_max_length; transformers 4
also special_tokens_map.json).
"""

from __future__ import annotations

import json
from pathlib import Path

from omnissl.datamodules.tokenizers import SPECIAL_TOKENS, tokenizer_info

__all__ = ["hf_tokenizer", "save_hf_tokenizer"]


def hf_tokenizer(tokenizer_json: str, *, model_max_length: int | None = None):
    """transformers.PreTrainedTokenizerFast over the tokenizer in `tokenizer_json` (its JSON text)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    info = tokenizer_info(Tokenizer.from_str(tokenizer_json))  # raises for neither special-token layout
    roles = SPECIAL_TOKENS[info.kind]
    spec = json.loads(tokenizer_json)
    if info.kind == "bpe":  # RoBERTa's <mask> swallows the space before it (its added token has lstrip)
        for added in spec.get("added_tokens", []):
            if added.get("content") == roles["mask"]:
                added["lstrip"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    mask = roles["mask"]
    kwargs = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=roles["bos"], eos_token=roles["eos"], cls_token=roles["bos"],
        sep_token=roles["eos"], pad_token=roles["pad"], unk_token=roles["unk"], mask_token=mask,
        padding_side="right", **kwargs)


def save_hf_tokenizer(tokenizer_json: str, out: str | Path, *, model_max_length: int | None = None) -> None:
    """Write the transformers tokenizer files of `tokenizer_json` into `out`."""
    hf_tokenizer(tokenizer_json, model_max_length=model_max_length).save_pretrained(str(out))
