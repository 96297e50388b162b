"""The README's first command: build a small AttnStream, save it, reload it through the Auto classes, generate.

    make demo        (or: python examples/quickstart.py)

The model is untrained, so the story is noise; the point is the round trip every user relies on.
"""

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, pipeline

import amformers
from amformers.train.tokenizer import load_tokenizer


def main():
    torch.manual_seed(0)
    tokenizer = load_tokenizer()  # the byte-level BPE shipped in the package (8,192 tokens)
    config = amformers.AttnStreamConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=8,
        attention_stream="values",
        stream_weights="learned",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = amformers.AttnStreamForCausalLM(config)
    print(
        f"built AttnStream: {sum(p.numel() for p in model.parameters()):,} parameters, stream={config.attention_stream}"
    )

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        print("saved:", ", ".join(sorted(p.name for p in Path(folder).iterdir())))
        reloaded = AutoModelForCausalLM.from_pretrained(folder)
        print(f"reloaded as {type(reloaded).__name__} through AutoModelForCausalLM")

        prompt = tokenizer("Once upon a time", return_tensors="pt")
        with torch.no_grad():
            same = torch.equal(model.eval()(**prompt).logits, reloaded(**prompt).logits)
        print("reloaded logits identical:", same)

        generator = pipeline("text-generation", model=reloaded, tokenizer=tokenizer)
        text = generator("Once upon a time", max_new_tokens=20, do_sample=False)[0]["generated_text"]
        print("generated (untrained weights):", repr(text))


if __name__ == "__main__":
    main()
