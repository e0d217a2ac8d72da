"""sweep.study: the one storage opener, and the study's budget across processes."""

from __future__ import annotations

import optuna
import pytest

from sweep.messages import UsageError
from sweep.study import budget_used, open_storage, open_study


def test_a_journal_path_opens_a_journal_and_creates_its_folder(tmp_path):
    storage = open_storage(str(tmp_path / "new" / "study.journal"))
    study, created = open_study(storage, "s", direction="minimize", sampler=None, pruner=None)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    again, created_again = open_study(open_storage(str(tmp_path / "new" / "study.journal")), "s",
                                      direction="minimize", sampler=None, pruner=None)
    assert (created, created_again) == (True, False)
    assert budget_used(again.get_trials()) == 2


@pytest.mark.postgres
def test_a_bare_postgresql_url_opens_with_the_installed_driver(postgres_url):
    bare = postgres_url.replace("postgresql+psycopg2://", "postgresql://", 1)
    study, _ = open_study(open_storage(bare), "bare", direction="minimize", sampler=None, pruner=None)
    study.enqueue_trial({"x": 0.5})
    assert optuna.get_all_study_names(open_storage(postgres_url)) == ["bare"]


def test_an_unreachable_database_is_a_usage_error_naming_it_without_its_password():
    from tests.conftest import free_port

    with pytest.raises(UsageError, match=r"cannot open storage postgresql://u:\*\*\*@127\.0\.0\.1") as info:
        open_storage(f"postgresql://u:pw@127.0.0.1:{free_port()}/db")
    assert "pw" not in str(info.value)
