"""Input validation shared by every model family: clear errors instead of deep stack traces.

Every check here reads shapes only, except the token-id range, which is a device-side assert: it costs no
host synchronisation (a GPU keeps running ahead), and it is skipped while `torch.compile` or `torch.export`
trace the forward, so nothing in the traced graph depends on the data.
"""

import torch


def check_model_inputs(config, input_ids, inputs_embeds, attention_mask) -> None:
    """Refuse inputs that would otherwise fail deep inside an op (or silently give garbage)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
    if input_ids is not None:
        if input_ids.dim() != 2:
            raise ValueError(f"`input_ids` must be [batch, seq_len], got shape {tuple(input_ids.shape)}.")
        batch_and_length = tuple(input_ids.shape)
    else:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(
                f"`inputs_embeds` must be [batch, seq_len, hidden_size={config.hidden_size}], "
                f"got shape {tuple(inputs_embeds.shape)}."
            )
        batch_and_length = tuple(inputs_embeds.shape[:2])
    name = "input_ids" if input_ids is not None else "inputs_embeds"
    if batch_and_length[0] == 0:
        raise ValueError(f"`{name}` holds no sequence (batch size 0, shape {batch_and_length}).")
    if batch_and_length[1] == 0:
        raise ValueError(f"`{name}` holds no tokens (sequence length 0, shape {batch_and_length}).")
    # During cached decoding the 2-D mask also covers past tokens, so its length may exceed seq_len.
    if (
        attention_mask is not None
        and attention_mask.dim() == 2
        and (attention_mask.shape[0] != batch_and_length[0] or attention_mask.shape[1] < batch_and_length[1])
    ):
        raise ValueError(
            f"`attention_mask` of shape {tuple(attention_mask.shape)} does not fit inputs of shape "
            f"{batch_and_length} (expected [batch, past + seq_len])."
        )
    if input_ids is not None and not torch.compiler.is_compiling():
        in_range = ((input_ids >= 0) & (input_ids < config.vocab_size)).all()
        torch._assert_async(
            in_range,
            f"Token ids must lie in [0, vocab_size={config.vocab_size}); some of `input_ids` do not. "
            "Is the tokenizer the model's own?",
        )


def check_labels(labels, input_ids, inputs_embeds) -> None:
    """Labels must be [batch, seq_len] like the inputs (the loss shifts them itself)."""
    reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
    if labels.shape != reference.shape:
        raise ValueError(
            f"`labels` of shape {tuple(labels.shape)} must match the inputs' [batch, seq_len] "
            f"shape {tuple(reference.shape)}."
        )
