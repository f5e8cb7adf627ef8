"""Hot-swap planning and MODEL_ALIASES parsing: which workers a command goes to, and which aliases are valid."""

from __future__ import annotations

import pytest

from common.control import PlanError, decode_command, new_command, plan
from common.protocol import WorkerInfo
from common.settings import SettingsError, load_settings, parse_aliases


def worker(worker_id: str, model: str, kind: str = "chat", loading: str = "") -> WorkerInfo:
    return WorkerInfo(worker_id=worker_id, kind=kind, model=model, device="cpu", dtype="float32", hostname="h",  # type: ignore[arg-type]
                      pid=1, started=0.0, loading=loading)


FLEET = [worker("w1", "a"), worker("w2", "b"), worker("w3", "b"), worker("idle-embed", "", "embed"),
         worker("idle-chat", "", "chat"), worker("busy", "", "chat", loading="c")]


def test_load_goes_to_an_idle_worker_of_its_kind_or_the_named_one() -> None:
    assert plan(new_command("load", "c"), FLEET) == ["idle-chat"]
    assert plan(new_command("load", "e", kind="embed"), FLEET) == ["idle-embed"]
    assert plan(new_command("load", "c"), FLEET, "w1") == ["w1"]
    assert plan(new_command("load", "a"), FLEET) == []  # served already
    with pytest.raises(PlanError) as err:
        plan(new_command("load", "c"), FLEET[:3])
    assert (err.value.status, err.value.code) == (409, "no_idle_worker")
    with pytest.raises(PlanError) as err:
        plan(new_command("load", "c"), FLEET, "gone")
    assert (err.value.status, err.value.code) == (404, "worker_not_found")


def test_unload_goes_to_every_worker_serving_the_model() -> None:
    assert plan(new_command("unload", "b"), FLEET) == ["w2", "w3"]
    assert plan(new_command("unload", "b"), FLEET, "w3") == ["w3"]
    for command, named in ((new_command("unload", "z"), None), (new_command("unload", "a"), "w2")):
        with pytest.raises(PlanError) as err:
            plan(command, FLEET, named)
        assert (err.value.status, err.value.code) == (404, "model_not_found")


def test_commands_round_trip_as_json() -> None:
    command = new_command("load", "m", kind="rerank", served_name="n")
    assert decode_command(b'{"id":"x","action":"unload","model":"m"}').action == "unload"
    assert decode_command(__import__("msgspec").json.encode(command)) == command


def test_aliases_parse_from_pairs_or_json() -> None:
    assert parse_aliases("gpt-4o-mini=models/tiny, gpt-4o = models/big,") == {"gpt-4o-mini": "models/tiny",
                                                                              "gpt-4o": "models/big"}
    assert parse_aliases('{"gpt-4o-mini": "models/tiny"}') == {"gpt-4o-mini": "models/tiny"}
    assert parse_aliases("") == {}


@pytest.mark.parametrize("value", ["gpt-4o-mini", "a=", "=b", "a=a", "a=b,b=c", "{not json", '["a"]', '{"a": 1}'])
def test_bad_aliases_stop_the_process_with_one_line(value: str) -> None:
    with pytest.raises(SettingsError, match="MODEL_ALIASES"):
        load_settings({"MODEL_ALIASES": value})
