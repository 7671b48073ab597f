import math

import pytest
import torch
import torch.nn.functional as F
from lightly.utils.benchmarking import knn_predict

import downstream.knn as knn_module
from downstream.knn import faiss_exact_search, faiss_search, knn_metrics, parse_ks, predict, search_name, torch_search, vote
from seed.errors import SeedError
from seed.knn import knn_top1


def random_set(n: int, dim: int = 32, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator), torch.randint(0, classes, (n,), generator=generator)


def clusters(per_class: int, classes: int = 5, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight clusters around orthogonal directions: every neighbour of a point shares its class."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    centres = torch.eye(dim)[:classes] * 10
    return centres[labels] + 0.1 * torch.randn(len(labels), dim, generator=generator), labels


@pytest.mark.parametrize("temperature", [0.07, None])
def test_faiss_and_brute_force_agree(temperature):
    bank, bank_labels = random_set(2000)
    queries, _ = random_set(300, seed=1)
    from_faiss = predict(bank, bank_labels, queries, 10, k=200, temperature=temperature, backend="faiss")
    from_torch = predict(bank, bank_labels, queries, 10, k=200, temperature=temperature, backend="torch")
    assert torch.equal(from_faiss, from_torch)


def test_matches_lightly_knn_predict():
    bank, bank_labels = random_set(1000)
    queries, _ = random_set(200, seed=2)
    ours = predict(bank, bank_labels, queries, 10, k=50, temperature=0.07)
    theirs = knn_predict(F.normalize(queries, dim=1), F.normalize(bank, dim=1).T, bank_labels, 10, knn_k=50, knn_t=0.07)[:, 0]
    assert torch.equal(ours, theirs)


def test_the_training_monitor_votes_as_seed_eval_knn():
    """One vote: the monitor's top-1 is seed-eval knn's weighted k=200 top-1 on the same features (and lightly's, above)."""
    bank, bank_labels = random_set(1500)
    queries, query_labels = random_set(300, seed=4)
    expected = knn_metrics(bank, bank_labels, queries, query_labels, 10, ks=(200,), temperature=0.07)["top1_k200"]
    assert knn_top1(bank, bank_labels, queries, query_labels, 10, k=200) == expected


def test_torch_search_is_exact_across_bank_chunks():
    bank, _ = random_set(1000)
    queries, _ = random_set(70, seed=3)
    bank, queries = F.normalize(bank, dim=1), F.normalize(queries, dim=1)
    chunks = list(torch_search(bank, queries, 25, chunk=32, bank_chunk=128))
    sims, idx = torch.cat([s for s, _ in chunks]), torch.cat([i for _, i in chunks])
    expected_sims, expected_idx = (queries @ bank.T).topk(25, dim=1)
    assert torch.allclose(sims, expected_sims) and torch.equal(idx, expected_idx)
    faiss_idx = torch.cat([i for _, i in faiss_search(bank, queries, 25, chunk=16)])
    assert torch.equal(faiss_idx, expected_idx)
    chunked = list(faiss_exact_search(bank, queries, 25, chunk=32, bank_chunk=128))
    assert [len(s) for s, _ in chunked] == [32, 32, 6]
    assert torch.equal(torch.cat([i for _, i in chunked]), expected_idx)
    assert torch.allclose(torch.cat([s for s, _ in chunked]), expected_sims)
    index_idx = torch.cat([i for _, i in faiss_search(bank, queries, 25, gpu=False, index="ivf", nlist=1, nprobe=1)])
    assert torch.equal(index_idx, expected_idx)  # one IVF cell visited is the exact search through an index


def test_auto_search_is_faiss_when_installed_else_torch(monkeypatch):
    monkeypatch.setattr(knn_module, "faiss_gpu_available", lambda: False)
    assert search_name("auto", "flat") == search_name("faiss", "flat") == "faiss knn (exact)" and search_name("torch", "flat") == "torch"
    assert search_name("auto", "ivf") == "faiss IndexIVFFlat"
    monkeypatch.setattr(knn_module, "faiss_gpu_available", lambda: True)
    assert search_name("auto", "flat") == "faiss IndexFlatIP (GPU)"
    monkeypatch.setattr(knn_module, "faiss_installed", lambda: False)
    assert search_name("auto", "flat") == "torch"
    with pytest.raises(SeedError, match="--index ivf is faiss's"):
        search_name("torch", "ivf")


def test_without_faiss_its_backend_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "faiss", None)  # import faiss raises ImportError
    monkeypatch.setattr(knn_module, "faiss_installed", lambda: False)
    bank, labels = random_set(100)
    assert len(predict(bank, labels, bank[:10], 10, k=5)) == 10  # auto: the torch search
    with pytest.raises(SeedError, match="faiss is not installed: pip install faiss-cpu"):
        predict(bank, labels, bank[:10], 10, k=5, backend="faiss")


@pytest.mark.parametrize("backend, options", [("faiss", {}), ("torch", {}), ("faiss", {"index": "ivf", "nlist": 5, "nprobe": 5})])
def test_separated_clusters_are_classified_perfectly(backend, options):
    bank, bank_labels = clusters(60)
    queries, query_labels = clusters(20, seed=1)
    metrics = knn_metrics(bank, bank_labels, queries, query_labels, 5, ks=[20, 5], backend=backend, **options)
    assert metrics["top1_k20"] == 100.0 and metrics["top1_k5_majority"] == 100.0
    assert metrics["top5_k20"] == 100.0


def test_hand_computed_weighted_and_majority_votes():
    """Query (1, 0); its 3 nearest bank points have cosine 1.0 (class 0), 0.8 and 0.6 (class 1).

    Weighted: class 0 scores exp(1/0.07) = e^14.29, class 1 exp(0.8/0.07) + exp(0.6/0.07) = e^11.43 + e^8.57: class 0 wins.
    Majority: class 1 has two votes against one.
    """
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    bank_labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    sims, idx = next(faiss_search(bank, query, 3))
    assert idx.tolist() == [[0, 1, 2]]
    scores = vote(sims, idx, bank_labels, 2, k=3, temperature=0.07)
    assert scores[0, 0].item() == pytest.approx(math.exp(1 / 0.07), rel=1e-5)
    assert scores[0, 1].item() == pytest.approx(math.exp(0.8 / 0.07) + math.exp(0.6 / 0.07), rel=1e-5)
    assert predict(bank, bank_labels, query, 2, k=3, temperature=0.07).tolist() == [0]
    assert predict(bank, bank_labels, query, 2, k=3, temperature=None).tolist() == [1]
    assert predict(bank, bank_labels, query, 2, k=1, temperature=None).tolist() == [0]


def test_missing_neighbours_do_not_vote():
    sims = torch.tensor([[0.9, 0.5, -3.4e38]])
    idx = torch.tensor([[1, 0, -1]])
    scores = vote(sims, idx, torch.tensor([0, 1]), 2, k=3, temperature=None)
    assert scores.tolist() == [[1.0, 1.0]]


def test_k_larger_than_the_bank_uses_the_whole_bank():
    bank, bank_labels = clusters(3, classes=2)
    metrics = knn_metrics(bank, bank_labels, bank, bank_labels, 2, ks=[200])
    assert metrics == {"top1_k6": 100.0, "top1_k6_majority": 50.0}  # majority of all 6 is a tie: class 0 wins


def test_parse_ks():
    assert parse_ks("200,20") == [200, 20]
    assert parse_ks("20, 20") == [20]
    with pytest.raises(SeedError, match="whole numbers"):
        parse_ks("a")
    with pytest.raises(SeedError, match="at least 1"):
        parse_ks("0")
