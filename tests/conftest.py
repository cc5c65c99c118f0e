"""Test-wide settings: offline hub, deterministic small thread count, and shared tiny fixtures."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("DISABLE_TQDM", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_torch():
    """Each test starts from the same global RNG state, so failures reproduce."""
    try:
        import torch
    except ImportError:  # pragma: no cover
        yield
        return
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """torch on 1 intra-op thread for a module (use: ``pytestmark = pytest.mark.usefixtures("one_thread")``):
    on 2 shared cores more threads only oversubscribe them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_tokenizer(tmp_path_factory):
    """The toy BPE tokenizer trained on 300 scenes' texts (seconds; shared by the toy tests)."""
    from toy.tokenizer import train_toy_tokenizer

    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_toy_tokenizer(folder, n_scenes=300, seed=0)
    return folder
