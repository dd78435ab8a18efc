import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default model, loaded once for the whole run. Tests
    that patch it must unpatch it before they return."""
    from fastpeft.default_model import load_default_model

    model, tokenizer = load_default_model()
    return model.eval(), tokenizer
