"""Forward adapters: small modules around an HF model whose forward is the one training calls
(so DDP/FSDP wrap it): a scalar head at every position, labelled-token logprobs for SFT, the
shared actor-critic trunk, and the prompt-sharing RM scorer."""

from __future__ import annotations

import torch
from torch import nn

from rlhfkit.algos import last_index, token_logprobs
from rlhfkit.algos import position_ids as positions_of
from rlhfkit.models.compat import cache_kwargs, output_cache
from rlhfkit.models.loading import backbone, init_scalar_head, scalar_head


class PerTokenScalar(nn.Module):
    """The scalar head applied at every position: V(s_t) for a critic, r for a reward model.

    (B, L) ids -> (B, L) float32. A module of its own so that DDP can wrap the forward that training
    calls (HF's sequence-classification forward only returns the pooled last-token score)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        hidden = backbone(self.model)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state
        # sum over the size-1 head output drops that dim exactly and returns a new tensor, not a
        # view (FSDP2 warns about views returned from a sharded module's forward)
        return scalar_head(self.model)(hidden).sum(-1).float()


def logit_transform(conf) -> str | None:
    """The config key of a transform some models apply after the LM head (Gemma-2 soft-capping,
    Cohere's logit scale), or None when the logits are plainly lm_head(hidden)."""
    for k in ("final_logit_softcapping", "logit_scale"):
        if getattr(conf, k, None) not in (None, 1, 1.0):
            return k
    return None


class LabelledLogprobs(nn.Module):
    """SFT's forward: log p(next token) at the labelled positions only. (B, L) -> (N,) float32.

    The LM head, half of a small model's FLOPs, runs only on the hidden states that predict a
    labelled token: prompt and padding positions cost no head work, and no (B, L, V) float32
    logits are kept (chunked log-softmax). A module of its own so that DDP/FSDP wrap the forward
    that training calls. Models with a logit transform take the plain full-logits path."""

    def __init__(self, model, ignore_index: int = -100):
        super().__init__()
        self.model, self.ignore_index = model, ignore_index
        self.plain_head = logit_transform(model.config) is None

    def forward(self, input_ids, attention_mask, labels, position_ids=None) -> torch.Tensor:
        """``attention_mask`` None with ``position_ids`` that restart: a packed batch."""
        target = labels[:, 1:]  # (B, L-1): the token that position t predicts is labels[t+1]
        keep = target != self.ignore_index
        kw = {"attention_mask": attention_mask, "position_ids": position_ids, "use_cache": False}
        if self.plain_head:
            hidden = backbone(self.model)(input_ids=input_ids, **kw).last_hidden_state  # (B, L, H)
            logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
        else:
            out = self.model(input_ids=input_ids, **kw)
            logits = out.logits[:, :-1][keep]  # (N, V)
        return token_logprobs(logits[None], target[keep][None])[0]


class ActorCritic(nn.Module):
    """The shared-trunk option: one transformer whose last hidden state feeds both the LM head
    (pi_theta) and a scalar value head (V_phi), so one forward gives logprobs and values.

    Saves a trunk's memory and a forward pass per step; the price is that the policy and value
    losses pull on the same weights (Schulman et al. 2017 share a trunk; InstructGPT does not).
    """

    def __init__(self, policy, value_head: nn.Linear | None = None):
        super().__init__()
        conf = policy.config
        if (k := logit_transform(conf)) is not None:
            raise ValueError(
                f"shared_trunk: {conf.model_type} applies {k} after its LM head; "
                "the shared trunk supports models whose logits are lm_head(hidden)"
            )
        self.policy = policy
        if value_head is None:
            lm_head = policy.get_output_embeddings()
            value_head = nn.Linear(lm_head.in_features, 1, bias=False)
            value_head.to(device=lm_head.weight.device, dtype=lm_head.weight.dtype)
            init_scalar_head(value_head)
        self.value_head = value_head

    def trunk_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep: int | torch.Tensor):
        """-> logits (B, K, V) of the last ``logits_to_keep`` columns (or of the columns a tensor
        of indices names, as HF's ``logits_to_keep``), values (B, L) float32."""
        hidden = backbone(self.policy)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state  # (B, L, H)
        keep = logits_to_keep
        cols = slice(-keep, None) if isinstance(keep, int) else keep
        logits = self.policy.get_output_embeddings()(hidden[:, cols])
        return logits, self.value_head(hidden).sum(-1).float()  # (B, L): see PerTokenScalar


class PromptSharingScorer(nn.Module):
    """A reward model's scores for K responses to each prompt, with the prompt forwarded once.

    Causal attention makes the prompt's hidden states the same under every response, so the
    prompt runs once (its KV cache repeated K times) and only the responses run K times: with K=2
    and a prompt as long as a response that is a quarter of the tokens saved, with K=4 more. The
    gradient reaches the prompt through the cache. A prompt width of 0 is the plain forward.

    prompt_ids/mask (B, P) left-padded; response_ids/mask (B*K, R) right-padded, K rows per prompt,
    each with at least one token. Returns the score at each response's last token, (B*K,) float32.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def _can_share(self, body) -> bool:
        """Checkpointed layers keep no KV cache; FSDP2 frees a block's gathered weights after
        each call, and a second call of the same block in one forward breaks its backward."""
        from torch.distributed.tensor import DTensor

        if self.training and getattr(body, "gradient_checkpointing", False):
            return False
        return not any(isinstance(p, DTensor) for p in self.model.parameters())

    def forward(
        self, prompt_ids, prompt_mask, response_ids, response_mask, position_ids=None, ends=None
    ) -> torch.Tensor:
        body = backbone(self.model)
        if position_ids is not None:  # a packed batch: whole sequences, read at ``ends`` (N, 2)
            hidden = body(
                input_ids=response_ids, position_ids=position_ids, use_cache=False
            ).last_hidden_state  # (R, L, H)
            h = hidden[ends[:, 0], ends[:, 1]]  # (N, H)
            return scalar_head(self.model)(h).sum(-1).float()
        k = response_ids.shape[0] // max(prompt_ids.shape[0], 1)
        cache, prompt_len = None, torch.zeros_like(response_mask[:, :1])
        attn = response_mask
        if prompt_ids.shape[1] > 0 and not self._can_share(body):
            # run the K whole sequences, [prompt | response], in the layout PPO uses
            ids = torch.cat([prompt_ids.repeat_interleave(k, dim=0), response_ids], dim=1)
            attn = torch.cat([prompt_mask.repeat_interleave(k, dim=0), response_mask], dim=1)
            pos = positions_of(attn)
            hidden = body(input_ids=ids, attention_mask=attn, position_ids=pos).last_hidden_state
            last = prompt_ids.shape[1] + last_index(response_mask)  # (B*K,)
            h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            return scalar_head(self.model)(h).sum(-1).float()
        if prompt_ids.shape[1] > 0:
            pos = positions_of(prompt_mask)
            cache = body(
                input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True
            )
            cache = output_cache(cache)
            cache.batch_repeat_interleave(k)  # (B*K, heads, P, d) per layer
            pm = prompt_mask.repeat_interleave(k, dim=0)  # (B*K, P)
            prompt_len, attn = pm.sum(1, keepdim=True), torch.cat([pm, response_mask], dim=1)
        positions = prompt_len + torch.arange(response_ids.shape[1], device=response_ids.device)
        hidden = body(
            input_ids=response_ids,
            attention_mask=attn,
            position_ids=positions,
            **cache_kwargs(body, cache),
            use_cache=cache is not None,
        ).last_hidden_state  # (B*K, R, H)
        last = last_index(response_mask)  # (B*K,) right padding: the last real token
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B*K, H)
        return scalar_head(self.model)(h).sum(-1).float()  # see PerTokenScalar for the sum
