"""Any local Hugging Face causal LM used as the selector: it scores the candidates the same way."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import ModelOutput

from overlay.selector.model import PAD_ID, SelectorOutput, candidate_head, key_mask


class HFCausalSelector(nn.Module):
    """A user's local Hugging Face causal LM used as the selector, scoring candidates the same way."""

    def __init__(self, model: str | Path | PreTrainedModel, pad_token_id: int = PAD_ID) -> None:
        super().__init__()
        if isinstance(model, (str, Path)):
            model = AutoModelForCausalLM.from_pretrained(str(model), local_files_only=True,
                                                         attn_implementation="eager")
        if model.get_output_embeddings() is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings to score candidates against")
        self.model = model
        self.config = model.config
        self.pad_token_id = pad_token_id

    def _base(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              output_hidden_states: bool = False, output_attentions: bool = False) -> ModelOutput:
        """Run the LM's base model (no LM head, so no full-vocabulary logits) with left padding masked."""
        mask = key_mask(input_ids, attention_mask, self.pad_token_id).long()
        return self.model.base_model(input_ids=input_ids, attention_mask=mask,
                                     position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=False,
                                     output_hidden_states=output_hidden_states, output_attentions=output_attentions)

    def forward(
        self,
        input_ids: torch.Tensor,
        candidate_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        full_vocab_weight: float = 0.0,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        attention_mask: torch.Tensor | None = None,
        **_: object,
    ) -> SelectorOutput:
        """Same contract as SelectorModel.forward; left padding is masked and positions start at the first real token."""
        out = self._base(input_ids, attention_mask, output_hidden_states, output_attentions)
        last = out.last_hidden_state[:, -1]
        head = self.model.get_output_embeddings()
        loss, logits, full = candidate_head(last, head.weight, candidate_ids, labels, full_vocab_weight,
                                            bias=getattr(head, "bias", None), pad_id=self.pad_token_id)
        return SelectorOutput(loss=loss, logits=logits,
                              hidden_states=out.hidden_states if output_hidden_states else None,
                              attentions=out.attentions if output_attentions else None, full_logits=full)

    def score(self, input_ids: torch.Tensor, candidate_ids: torch.Tensor,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Decode-path scores [B,K] for the given candidates, without autograd."""
        with torch.inference_mode():
            return self(input_ids, candidate_ids, attention_mask=attention_mask).logits

    def full_vocab_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits over the whole vocabulary [B,V]: for the evaluation baseline only."""
        with torch.inference_mode():
            last = self._base(input_ids, attention_mask).last_hidden_state[:, -1]
            head = self.model.get_output_embeddings()
            full = last @ head.weight.T
            return full if getattr(head, "bias", None) is None else full + head.bias

    def save_pretrained(self, folder: str | Path, **kwargs: object) -> None:
        """Save the wrapped causal LM the Hugging Face way (config.json + safetensors)."""
        self.model.save_pretrained(str(folder), **kwargs)

