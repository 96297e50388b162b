import os

# Never reach a hub from tests: everything loads from local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


TOKENIZER_TEXT = [
    "Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog.",
    "After John and Mary went to the store, John gave a bottle of milk to Mary.",
    "Tom and Sam were friends. One day they found a big red ball under the tree.",
    "The cat sat on the mat and looked at the bird. The bird sang a happy song.",
    "Mary has a book. Where is the book? The book is in the kitchen.",
] * 4


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE (~300 tokens) with distinct bos/eos/pad, built offline in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|pad|>", "<|bos|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_TEXT, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|endoftext|>"
    )
