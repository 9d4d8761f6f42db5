"""Sections of what the pipeline starts from: the base model, the corpus and its split, the
tokenizer, and the shape of a model trained from scratch (stages: base, prepare, pretrain).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmpipe.config.base import Section


class BaseParams(Section):
    """The model to start from; '' trains one from scratch (stages: base, prepare, pretrain)."""

    model: str = Field(
        "",
        description="'' = from scratch; or a Hugging Face model folder, a .gguf file, or a hub id",
    )
    revision: str | None = Field(
        None, description="hub ids: the commit or tag to load (recorded in every manifest)"
    )
    template: Literal["auto", "chat", "plain"] = Field(
        "auto",
        description="auto: the base's own chat template if any; chat: require it; plain: prompt, "
        "blank line, answer (from scratch: always lmpipe's one-turn format)",
    )

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return v.strip()


class DataParams(Section):
    """Corpus source, cleanup, split, SFT pairs and prompt sets (stage: prepare)."""

    source: Literal["builtin", "text", "jsonl", "hf"] = Field(
        "builtin", description="where documents come from"
    )
    path: str = Field(
        "",
        description="text: file or glob; jsonl: file or glob; hf: dataset name or save_to_disk dir",
    )
    field: str = Field("text", description="jsonl/hf: the field that holds a document's text")
    hf_config: str | None = Field(None, description="hf: dataset configuration name")
    hf_split: str = Field("train", description="hf: split to read")
    separator: str = Field(
        r"\n\s*\n", description="text: regex that separates documents (default: blank lines)"
    )

    @field_validator("separator")
    @classmethod
    def _separator(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as err:
            raise ValueError(f"not a valid regular expression ({err})") from None
        return v

    chunk_chars: int = Field(
        0, ge=0, description="text: >0 cuts each file into chunks of about this many characters"
    )
    encoding: str = Field("utf-8", description="text/jsonl: file encoding")
    encoding_errors: Literal["strict", "replace", "ignore"] = Field(
        "strict",
        description="undecodable bytes: strict fails, replace writes U+FFFD, ignore drops them",
    )
    builtin_stories: int = Field(20000, ge=10, description="builtin: number of generated stories")
    unicode_form: Literal["NFC", "NFKC", "none"] = Field(
        "NFC", description="Unicode normalisation applied to every document"
    )
    min_chars: int = Field(20, ge=1, description="documents shorter than this after cleanup drop")
    max_docs: int = Field(0, ge=0, description="keep at most this many documents (0 = all)")
    val_fraction: float = Field(0.05, gt=0, lt=1, description="share of documents for val")
    test_fraction: float = Field(0.05, gt=0, lt=1, description="share of documents for test")
    sft_path: str = Field(
        "", description="JSONL with prompt/response fields; empty = pairs built from documents"
    )
    prompt_sentences: int = Field(1, ge=1, description="sentences of a document used as prompt")
    response_sentences: int = Field(
        3, ge=1, description="sentences after the prompt used as the SFT response"
    )
    max_prompt_chars: int = Field(300, ge=10, description="longer prompts are skipped")
    max_response_chars: int = Field(400, ge=10, description="longer responses are cut at a word")
    rl_prompts: int = Field(2000, ge=1, description="RL prompts taken from the val documents")
    rl_prompts_min: int = Field(
        1000,
        ge=0,
        description="when the val documents give fewer RL prompts than this, the rest come from "
        "the train documents' prompts (a small corpus; 0 = val only)",
    )
    eval_prompts: int = Field(200, ge=1, description="evaluation prompts from the test documents")

    @model_validator(mode="after")
    def _check(self) -> DataParams:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves "
                "less than 10% for train; lower them"
            )
        if self.source != "builtin" and not self.path:
            raise ValueError(f"data.source is {self.source!r}: set data.path to the input")
        return self


class TokenizerParams(Section):
    """Byte-level BPE trained on the train split (stage: prepare)."""

    vocab_size: int = Field(4096, ge=300, le=1_000_000, description="BPE vocabulary incl. specials")
    min_frequency: int = Field(2, ge=1, description="pairs seen fewer times are not merged")


class ModelParams(Section):
    """Shape of the causal LM trained from scratch (stage: pretrain; SFT and RL inherit it)."""

    arch: Literal["llama", "gpt2"] = Field(
        "llama", description="llama: RoPE, RMSNorm, SwiGLU, optional GQA; gpt2: learned positions"
    )
    d_model: int = Field(256, ge=8, description="hidden width")
    n_layers: int = Field(4, ge=1, description="transformer blocks")
    n_heads: int = Field(4, ge=1, description="attention heads (d_model must divide by it)")
    n_kv_heads: int = Field(0, ge=0, description="llama: key/value heads for GQA (0 = n_heads)")
    d_ff: int = Field(
        0,
        ge=0,
        description="MLP width (0 = 8/3*d_model rounded to 32 for llama, 4*d_model for gpt2)",
    )
    context: int = Field(128, ge=8, description="maximum sequence length in tokens")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in attention and MLP")
    tie_embeddings: bool = Field(True, description="share input embedding and output head")
    rope_theta: float = Field(10000.0, gt=0, description="llama: RoPE base")
    init_std: float = Field(0.02, gt=0, description="std of the normal weight initialisation")

    @model_validator(mode="after")
    def _check(self) -> ModelParams:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model = {self.d_model} must be divisible by n_heads = {self.n_heads}"
            )
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads = {self.n_heads} must be divisible by n_kv_heads = {kv}")
        if self.arch == "gpt2" and self.n_kv_heads not in (0, self.n_heads):
            raise ValueError("n_kv_heads (grouped-query attention) needs arch: llama")
        return self
