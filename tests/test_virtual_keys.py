"""Virtual keys (#18): made and revoked at run time through LiteLLM's admin paths, stored hashed,
with model lists, rpm, tpm, a token budget and an expiry enforced by one Redis script that two
gateway processes share. Real gateways, real workers, the session's Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import redis

from .conftest import CHAT, EMBED, GATEWAY_KEY, WorkerProcess, gateway_process, wait_until

MASTER = "sk-master-of-keys"
ASK = [{"role": "user", "content": "hello"}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gateways(config_path: Path, tmp_path_factory: pytest.TempPathFactory, chat_worker: WorkerProcess,
             embed_worker: WorkerProcess) -> Iterator[tuple[str, str, list[Path]]]:
    """Two gateway processes on one Redis, with a master key (from SMMF_MASTER_KEY): their
    URLs and log folders."""
    folders = [tmp_path_factory.mktemp("keys-gateway") for _ in range(2)]
    os.environ["SMMF_MASTER_KEY"] = MASTER
    try:
        with ExitStack() as stack:
            first, second = (stack.enter_context(gateway_process(config_path, folder)) for folder in folders)
            del os.environ["SMMF_MASTER_KEY"]
            yield first, second, folders
    finally:
        os.environ.pop("SMMF_MASTER_KEY", None)


def admin(url: str, path: str, body: dict | None = None, key: str = MASTER) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if body is None:
        return httpx.get(url + path, headers=headers, timeout=30)
    return httpx.post(url + path, json=body, headers=headers, timeout=30)


def new_key(url: str, **fields: object) -> str:
    response = admin(url, "/key/generate", fields)
    assert response.status_code == 200, response.text
    return str(response.json()["key"])


def chat(url: str, key: str, model: str = CHAT, max_tokens: int = 4) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      json={"model": model, "messages": ASK, "max_tokens": max_tokens, "temperature": 0})


def well_inside_a_minute_window(redis_client: redis.Redis, needed_s: int = 15) -> None:
    """Wait for a new minute on Redis' clock if fewer than `needed_s` seconds are left in this
    one: the limits count in fixed minute windows, and a test's requests must share one."""
    seconds = int(redis_client.time()[0]) % 60
    if seconds > 60 - needed_s:
        time.sleep(60 - seconds + 0.5)


def test_a_key_is_shown_once_and_stored_only_hashed(gateways: tuple[str, str, list[Path]],
                                                    redis_client: redis.Redis) -> None:
    first, second, folders = gateways
    # When the master key makes a key, with LiteLLM's field names
    made = admin(first, "/key/generate", {"key_alias": "team-a", "models": [CHAT], "rpm_limit": 100,
                                          "metadata": {"team": "a"}}).json()
    key = made["key"]
    # Then the key answers once, and its record (from either gateway) never holds it
    assert key.startswith("sk-") and made["key_alias"] == "team-a" and made["rpm_limit"] == 100
    assert chat(second, key).status_code == 200
    info = admin(second, f"/key/info?key={key}").json()
    assert info["info"]["metadata"] == {"team": "a"} and "key" not in info["info"]
    assert info["info"]["key_name"] == f"sk-...{key[-4:]}"
    stored = [redis_client.dump(name) or b"" for name in redis_client.scan_iter("smmf:vkey*")]
    assert stored and not any(key.encode() in value for value in stored)
    assert not any(key in (folder / "gateway.log").read_text() for folder in folders)
    listed = admin(first, "/key/list").json()
    assert made["token"] in listed["keys"] and key not in str(listed)


def test_only_the_master_key_reaches_the_admin_api(gateways: tuple[str, str, list[Path]]) -> None:
    first, _, _ = gateways
    key = new_key(first)
    for wrong in (GATEWAY_KEY, key, "sk-guess"):
        response = admin(first, "/key/generate", {}, key=wrong)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_the_admin_api_refuses_what_it_cannot_honour_with_a_clear_4xx(
        gateways: tuple[str, str, list[Path]]) -> None:
    first, _, _ = gateways
    new_key(first, key_alias="taken-alias")
    # A second key with the same alias is a conflict, not a bad request
    taken = admin(first, "/key/generate", {"key_alias": "taken-alias"})
    assert (taken.status_code, taken.json()["error"]["code"]) == (409, "key_alias_taken")
    # A boolean is no limit (pydantic alone would take true for 1)
    boolean = admin(first, "/key/generate", {"rpm_limit": True})
    assert (boolean.status_code, boolean.json()["error"]["param"]) == (400, "rpm_limit")
    # A duration past 9999 of a unit is refused (its expiry was no date: a 500)
    forever = admin(first, "/key/generate", {"duration": "99999999999d"})
    assert forever.status_code == 400 and "1 to 9999 of a unit" in forever.json()["error"]["message"]
    longest = admin(first, "/key/generate", {"duration": "9999mo"})
    assert longest.status_code == 200 and longest.json()["expires"] > "2800"
    # And /usage looks back no further than usage is kept, however far `since` reaches
    assert admin(first, "/usage?since=9999w").status_code == 200
    assert admin(first, "/usage?since=99999999999d").status_code == 400


def test_rpm_5_gives_exactly_5_successes_across_both_gateways(gateways: tuple[str, str, list[Path]],
                                                             redis_client: redis.Redis) -> None:
    first, second, _ = gateways
    key = new_key(first, rpm_limit=5)
    well_inside_a_minute_window(redis_client)
    # When eight requests go to the two gateways in turn
    answers = [chat((first, second)[i % 2], key, max_tokens=1) for i in range(8)]
    # Then exactly five succeed, and the rest get OpenAI's 429 with when to come back
    assert [a.status_code for a in answers] == [200] * 5 + [429] * 3
    assert answers[4].headers["x-ratelimit-remaining-requests"] == "0"
    refused = answers[5]
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-limit-requests"] == "5"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")


def test_tpm_stops_a_key_after_the_tokens_it_really_used(gateways: tuple[str, str, list[Path]],
                                                         redis_client: redis.Redis) -> None:
    first, second, _ = gateways
    key = new_key(first, tpm_limit=60)
    well_inside_a_minute_window(redis_client)
    totals: list[int] = []
    # When a key with tpm = 60 sends chats that reserve 8 tokens each (max_tokens)
    while len(totals) < 30:
        answer = chat((first, second)[len(totals) % 2], key, max_tokens=8)
        if answer.status_code == 429:
            break
        assert answer.status_code == 200, answer.text
        totals.append(answer.json()["usage"]["total_tokens"])
    # Then it is refused once the tokens really used (prompt and reply, not the 8 reserved)
    # leave no room for another reservation, and not before
    assert answer.status_code == 429 and answer.headers["x-ratelimit-limit-tokens"] == "60"
    assert sum(totals[:-1]) + 8 <= 60 < sum(totals) + 8
    assert int(answer.headers["x-ratelimit-remaining-tokens"]) == max(0, 60 - sum(totals))


def test_a_revoked_key_is_refused_by_both_gateways_on_its_next_request(
        gateways: tuple[str, str, list[Path]]) -> None:
    first, second, _ = gateways
    key = new_key(first, key_alias="to-revoke")
    assert chat(first, key).status_code == chat(second, key).status_code == 200
    deleted = admin(second, "/key/delete", {"key_aliases": ["to-revoke"]}).json()
    assert len(deleted["deleted_keys"]) == 1
    for url in (first, second):
        refused = chat(url, key)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401


def test_a_key_calls_only_its_models_and_lives_only_its_duration(gateways: tuple[str, str, list[Path]]) -> None:
    first, second, _ = gateways
    embed_only = new_key(first, models=["all-*"])
    embedded = httpx.post(f"{second}/v1/embeddings", headers={"Authorization": f"Bearer {embed_only}"},
                          json={"model": EMBED, "input": ["one text"]}, timeout=60)
    assert embedded.status_code == 200, embedded.text
    refused = chat(second, embed_only)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "model_not_allowed"
    listed = httpx.get(f"{first}/v1/models", headers={"Authorization": f"Bearer {embed_only}"}).json()
    assert [m["id"] for m in listed["data"]] == [EMBED]
    short_lived = new_key(first, duration="1s")
    time.sleep(2)
    expired = chat(first, short_lived)
    assert expired.status_code == 401 and "expired" in expired.json()["error"]["message"]


def test_a_token_budget_stops_a_key_and_usage_adds_up(gateways: tuple[str, str, list[Path]]) -> None:
    first, second, _ = gateways
    key = new_key(first, token_budget=40, budget_duration="30d")
    totals = []
    while len(totals) < 20:
        answer = chat((first, second)[len(totals) % 2], key, max_tokens=6)
        if answer.status_code != 200:
            break
        totals.append(answer.json()["usage"])
    assert answer.status_code == 429 and answer.json()["error"]["type"] == "insufficient_quota"
    assert sum(u["total_tokens"] for u in totals) >= 40 > sum(u["total_tokens"] for u in totals[:-1])
    usage = admin(first, f"/key/info?key={key}").json()["info"]["usage"]
    assert usage == {"requests": len(totals),
                     "prompt_tokens": sum(u["prompt_tokens"] for u in totals),
                     "completion_tokens": sum(u["completion_tokens"] for u in totals)}


def test_static_keys_still_work_beside_virtual_ones(gateways: tuple[str, str, list[Path]]) -> None:
    first, _, _ = gateways
    assert chat(first, GATEWAY_KEY).status_code == 200
    assert chat(first, "sk-never-made").status_code == 401
    assert chat(first, "not-a-key").status_code == 401


def smmf(config: Path, *args: str, command: str = "keys") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "smmf_queue", *command.split(), *args, "-c", str(config)],
                          capture_output=True, text=True, timeout=60)


def test_the_command_line_makes_and_revokes_keys_the_gateways_honour(
        gateways: tuple[str, str, list[Path]], config_path: Path) -> None:
    first, second, _ = gateways
    # When `smmf-queue keys generate` makes a key
    made = smmf(config_path, "generate", "--alias", "from-cli", "--model", CHAT, "--rpm", "50", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    # Then a gateway takes it, `keys list` shows it without the key, and `keys info` by alias
    # counts its request
    assert chat(first, key).status_code == 200
    listed = smmf(config_path, "list", "--json")
    assert "from-cli" in listed.stdout and key not in listed.stdout
    info = json.loads(smmf(config_path, "info", "from-cli", "--json").stdout)
    assert info["usage"]["requests"] == 1 and info["rpm_limit"] == 50
    # And once revoked there, both gateways refuse it
    assert smmf(config_path, "delete", "--alias", "from-cli").returncode == 0
    assert chat(first, key).status_code == chat(second, key).status_code == 401
    gone = admin(second, "/key/info?key=from-cli")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "key_not_found"


def test_the_command_line_names_a_bad_option(config_path: Path) -> None:
    for args, expected in ((["--rpm", "0"], "--rpm"), (["--duration", "soon"], "--duration"),
                           (["--metadata", "{not json"], "--metadata")):
        refused = smmf(config_path, "generate", *args)
        assert refused.returncode == 1 and expected in refused.stderr, refused.stderr


def test_usage_is_reported_by_key_and_model(gateways: tuple[str, str, list[Path]], config_path: Path) -> None:
    first, second, _ = gateways
    key = new_key(first, key_alias="usage-team")
    # When the key makes two chats and an embedding, through both gateways
    chats = [chat(url, key).json()["usage"] for url in (first, second)]
    embedded = httpx.post(f"{second}/v1/embeddings", headers={"Authorization": f"Bearer {key}"},
                          json={"model": EMBED, "input": ["one", "two"]}, timeout=60).json()["usage"]
    # Then /usage, `smmf-queue usage` and the gateways' Prometheus counters say the same
    want = {(CHAT, "requests"): 2, (CHAT, "prompt_tokens"): sum(u["prompt_tokens"] for u in chats),
            (CHAT, "completion_tokens"): sum(u["completion_tokens"] for u in chats),
            (EMBED, "requests"): 1, (EMBED, "prompt_tokens"): embedded["prompt_tokens"],
            (EMBED, "completion_tokens"): 0}
    rows = admin(first, "/usage?key=usage-team&since=1d").json()["data"]
    assert {(r["model"], m): r[m] for r in rows for m in ("requests", "prompt_tokens", "completion_tokens")} == want
    assert all(r["key_alias"] == "usage-team" and r["failed"] == 0 for r in rows)
    from_cli = smmf(config_path, "--key", "usage-team", "--since", "7d", "--json", command="usage")
    assert json.loads(from_cli.stdout) == rows
    scraped = sum(_counter(url, "usage-team", CHAT, "completion") for url in (first, second))
    assert scraped == want[(CHAT, "completion_tokens")]


def _counter(url: str, alias: str, model: str, kind: str) -> float:
    """smmf_gateway_key_tokens_total for one alias, model and kind, from a gateway's /metrics."""
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {GATEWAY_KEY}"}).text
    labels = f'key_alias="{alias}",kind="{kind}",model="{model}"'
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("smmf_gateway_key_tokens_total{") and labels in line)


def _usage_frame(lines: list[str]) -> dict[str, int]:
    """The `usage` of a streamed reply's last chunk that has one (include_usage)."""
    usages = [json.loads(line[6:])["usage"] for line in lines
              if line.startswith("data: {") and json.loads(line[6:]).get("usage")]
    return dict(usages[-1])


def _key_usage(url: str, key: str) -> dict[str, int]:
    return dict(admin(url, f"/key/info?key={key}").json()["info"]["usage"])


def test_streamed_choices_are_charged_what_they_used(gateways: tuple[str, str, list[Path]]) -> None:
    first, _, _ = gateways
    key = new_key(first)
    # When a key streams a reply of two choices
    with httpx.stream("POST", f"{first}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": CHAT, "messages": ASK, "max_tokens": 16, "n": 2, "stream": True,
                            "stream_options": {"include_usage": True}}, timeout=60) as response:
        used = _usage_frame(list(response.iter_lines()))
    # Then the key is charged the reply's usage (the prompt once), not what it reserved
    assert used["prompt_tokens"] > 0
    wait_until(lambda: _key_usage(first, key)["requests"] == 1, 10, "the reply's usage counted")
    assert _key_usage(first, key) == {"requests": 1, "prompt_tokens": used["prompt_tokens"],
                                      "completion_tokens": used["completion_tokens"]}


def test_a_left_stream_is_charged_what_its_job_used_once_it_ends(
        config_path: Path, tmp_path_factory: pytest.TempPathFactory, chat_worker: WorkerProcess,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a gateway that lets a left stream's job run on for 30 s, for its reader to resume it
    graceful = tmp_path_factory.mktemp("left-stream") / "graceful.toml"
    graceful.write_text(config_path.read_text().replace("resume_grace_s = 0", "resume_grace_s = 30"))
    monkeypatch.setenv("SMMF_MASTER_KEY", MASTER)
    with gateway_process(graceful, graceful.parent) as url:
        key = new_key(url)
        headers = {"Authorization": f"Bearer {key}"}
        # When a key's stream is left after its first piece
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers=headers, timeout=60,
                          json={"model": CHAT, "messages": ASK, "max_tokens": 24, "stream": True,
                                "stream_options": {"include_usage": True}}) as response:
            resume = response.headers["x-smmf-resume"]
            next(line for line in response.iter_lines() if '"content":"' in line and '"content":""' not in line)
        # and resumed to its end
        with httpx.stream("GET", url + resume, headers=headers, timeout=60) as resumed:
            used = _usage_frame(list(resumed.iter_lines()))
        # Then the key is charged what the job used, once, as a request that did not fail
        wait_until(lambda: _key_usage(url, key)["requests"] == 1, 10, "the left stream's usage counted")
        assert _key_usage(url, key) == {"requests": 1, "prompt_tokens": used["prompt_tokens"],
                                        "completion_tokens": used["completion_tokens"]}
