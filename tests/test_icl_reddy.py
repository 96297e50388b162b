"""The Reddy-2023 in-context classification task and toy network (eval/icl_reddy.py)."""

import numpy as np
import pytest
import torch

from experiments.icl_reddy.run import (
    INPUT_DIM,
    NMAX,
    SEQ_LEN,
    VARIANTS,
    TaskData,
    TwoLayerAttention,
    accuracies,
    steps_to,
    train,
)

CONTENT = slice(2 * NMAX + 1, None)


def nearest_label(data: TaskData, vectors: torch.Tensor) -> np.ndarray:
    return np.abs(vectors.numpy()[:, :, None, :] - data.mus_label[None, None]).sum(-1).argmin(-1)


def test_bursty_sequences_hold_the_query_class_and_distinct_labels():
    data = TaskData(np.random.default_rng(0))
    inputs, labels, scored = data.sample(64, p_bursty=1.0, p_novel=0.0)
    assert inputs.shape == (64, SEQ_LEN, INPUT_DIM)
    positional = inputs[:, :, : 2 * NMAX + 1]
    assert torch.equal(positional.sum(-1), torch.ones(64, SEQ_LEN))  # one-hot position
    assert torch.all(positional.argmax(-1).diff(dim=1) == 1)  # consecutive positions at a random shift
    context_labels = nearest_label(data, inputs[:, 1:-1:2, CONTENT])
    for row, label in zip(context_labels, labels.tolist()):
        values, counts = np.unique(row, return_counts=True)
        assert len(values) == 4 and set(counts) == {2}  # 4 classes with distinct labels, 2 copies each
        assert label in values  # the answer is in context
    assert torch.equal(labels, scored)
    # the query exemplar is close to a context exemplar of its class
    query = inputs[:, -1, CONTENT]
    distances = (inputs[:, 0:-1:2, CONTENT] - query[:, None]).norm(dim=-1)
    nearest = nearest_label(data, inputs[:, 1:-1:2, CONTENT])[np.arange(64), distances.argmin(1).numpy()]
    assert (nearest == labels.numpy()).all()


def test_flipped_labels_are_scored_against_the_flipped_label():
    data = TaskData(np.random.default_rng(1))
    inputs, labels, scored = data.sample(32, p_bursty=1.0, p_novel=0.0, flip_labels=True)
    assert torch.equal(scored, (labels + 1) % 32)
    context_labels = nearest_label(data, inputs[:, 1:-1:2, CONTENT])
    assert all(int(s) in row for s, row in zip(scored, context_labels))  # the context shows the flipped label


@pytest.mark.parametrize("variant", VARIANTS)
def test_last_token_forward_matches_the_literal_network(variant):
    data = TaskData(np.random.default_rng(2))
    model = TwoLayerAttention(variant, torch.Generator().manual_seed(0))
    if variant.startswith("learned-"):
        with torch.no_grad():
            model.stream_weights.copy_(torch.tensor([0.7, 1.3]))
    inputs, labels, _ = data.sample(8)
    fast, slow = model(inputs), model.forward_all_positions(inputs)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    grads_fast = torch.autograd.grad(torch.nn.functional.cross_entropy(fast, labels), params)
    grads_slow = torch.autograd.grad(torch.nn.functional.cross_entropy(slow, labels), params)
    for a, b in zip(grads_fast, grads_slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert model.stream_weights.requires_grad == variant.startswith("learned-")


def test_streams_change_layer_two_only_as_specified():
    data = TaskData(np.random.default_rng(3))
    inputs, _, _ = data.sample(4)
    base = TwoLayerAttention("baseline", torch.Generator().manual_seed(0))
    values = TwoLayerAttention("values", torch.Generator().manual_seed(0))
    assert not torch.allclose(base(inputs), values(inputs))
    with torch.no_grad():
        values.stream_weights.copy_(torch.tensor([1.0, 0.0]))  # (w_own, w_src) = (1, 0) is the baseline
    torch.testing.assert_close(base(inputs), values(inputs))


def test_training_run_resumes_and_reports_steps(tmp_path):
    result = train("values", 0, iterations=4, eval_every=2, test_size=16, batch_size=8, run_dir=tmp_path)
    assert [h["step"] for h in result["history"]] == [0, 2, 4]
    assert (tmp_path / "result.json").is_file()
    again = train("values", 0, iterations=6, eval_every=2, test_size=16, batch_size=8, run_dir=tmp_path)
    assert [h["step"] for h in again["history"]] == [0, 2, 4, 6]  # resumed from step 4
    assert steps_to([{"step": 0, "test": 0.1, "ic": 0.96, "ic2": 0.2, "iw": 0.3}], 0.95)["ic"] == 0
    model = TwoLayerAttention("baseline")
    sets = TaskData(np.random.default_rng(0)).test_sets(10)
    assert set(accuracies(model, sets)) == {"test", "ic", "ic2", "iw"}
