import pytest


@pytest.fixture(autouse=True)
def _wandb_offline(monkeypatch, tmp_path):
    """No app test may reach wandb's servers: offline, with its folders under tmp_path."""
    from app_helpers import wandb_env

    for key, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
