"""The text encoder of text-conditioned models (sentence-transformers): captions to pooled and per-token embeddings,
for `orch prepare` (the dataset's captions) and `orch sample` (prompts)."""

from __future__ import annotations

import numpy as np
import torch

from orchestrator.components.vae import ModelLoadError, first_line, require_local_folder
from orchestrator.specs.prepare import TextSpec


def load_text_encoder(text_spec: TextSpec, device: str) -> tuple[object, int, int]:
    """(model, pooled dim, max tokens); probed on one caption so a model without what we need fails here."""
    from sentence_transformers import SentenceTransformer

    name = text_spec.encoder
    require_local_folder(name, "text.encoder")
    try:
        model = SentenceTransformer(name, device=device)
    except Exception as err:  # as for the VAE: any failure here means the model is not usable as named
        raise ModelLoadError(
            f"cannot load the text encoder {name!r}: {first_line(err)}. Without network it must already be on disk: "
            f"download it once with `hf download {name}` where there is internet, or set text.encoder to a local "
            "sentence-transformers folder (SentenceTransformer.save)"
        ) from None
    model.eval()
    # Truncate to the tokens we keep; a model's own limit (77 for CLIP, 256 for MiniLM) still applies.
    model.max_seq_length = min(text_spec.max_tokens, model.max_seq_length or text_spec.max_tokens)
    pooled, tokens = encode_texts(model, ["a photo"])[0]
    if tokens.shape[1] != pooled.shape[0]:  # the shard format has one text_dim for both
        raise ModelLoadError(
            f"the text encoder {name!r} gives pooled embeddings of width {pooled.shape[0]} but per-token ones of width "
            f"{tokens.shape[1]}; choose one whose widths agree (all OpenAI CLIPs and plain sentence-transformers do)"
        )
    return model, int(pooled.shape[0]), int(model.max_seq_length)


@torch.inference_mode()
def encode_texts(model, captions: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per caption: pooled (D,) and per-token (L, D_tok) float16 embeddings, without padding."""
    outputs = model.encode(
        captions, output_value=None, convert_to_numpy=False, batch_size=len(captions), show_progress_bar=False
    )
    if "token_embeddings" in outputs[0]:
        tokens = [o["token_embeddings"][o["attention_mask"].bool()] for o in outputs]  # (L_i, D) each
    else:
        tokens = _clip_token_embeddings(model, outputs)
    return [
        (o["sentence_embedding"].float().cpu().numpy().astype(np.float16), t.float().cpu().numpy().astype(np.float16))
        for o, t in zip(outputs, tokens)
    ]


def _clip_token_embeddings(model, outputs: list[dict]) -> list[torch.Tensor]:
    """CLIP models in sentence-transformers return only the pooled (projected) embedding; the per-token
    ones are the text transformer's last hidden states, what Stable Diffusion conditions on."""
    text_model = getattr(getattr(model[0], "model", None), "text_model", None)
    if text_model is None:
        raise ModelLoadError(
            f"the text encoder (a {type(model[0]).__name__}) gives no per-token embeddings; "
            "use a sentence-transformers model with a Transformer module (e.g. clip-ViT-L-14 or all-MiniLM-L6-v2)"
        )
    pad = torch.nn.utils.rnn.pad_sequence
    ids = pad([o["input_ids"] for o in outputs], batch_first=True)  # (N, L)
    mask = pad([o["attention_mask"] for o in outputs], batch_first=True)  # (N, L)
    device = next(text_model.parameters()).device
    hidden = text_model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state  # (N, L, D_tok)
    return [h[m.bool()] for h, m in zip(hidden, mask.to(device))]
