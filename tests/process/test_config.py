"""Settings from TOML and flags; every error names its key."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from evapi_worker.cli import main
from evapi_worker.config import ConfigError, load_config, parse_hostport, parse_node
from evapi_worker.core.engine import Anchor


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "worker.toml"
    path.write_text(text)
    return path


def test_full_file(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
log_level = "debug"
[[kamailio]]
name = "edge1"
evapi = "127.0.0.1:8448"
sip = "127.0.0.1:5070"
[[kamailio]]
name = "edge2"
evapi = "[::1]:8449"
[engine]
window = 30
anchor = "start"
user_agents = ["LinphoneiOS", "MyApp/.*iOS"]
[sipp]
max_concurrent = 4
transport = "tcp"
[evapi]
ack_timeout = 0.5
""",
        )
    )
    assert [(n.name, n.evapi_host, n.evapi_port, n.sip_port) for n in cfg.nodes] == [
        ("edge1", "127.0.0.1", 8448, 5070),
        ("edge2", "::1", 8449, 5060),
    ]
    assert cfg.engine.window == 30 and cfg.engine.anchor is Anchor.START
    assert cfg.engine.user_agents == ("LinphoneiOS", "MyApp/.*iOS")
    assert cfg.sipp.max_concurrent == 4 and cfg.sipp.transport == "tcp"
    assert cfg.evapi.ack_timeout == 0.5
    assert cfg.log_level == "debug"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[engine]\nwindow = 'long'", "engine.window"),
        ("[engine]\nwindow = -1", "engine.window"),
        ("[engine]\nanchor = 'middle'", "engine.anchor"),
        ("[engine]\nsettle = 10", "engine.settle"),
        ("[engine]\nuser_agents = ['(']", "engine.user_agents"),
        ("[engine]\nwindwo = 3", "engine.windwo"),
        ("[sipp]\nmax_concurrent = 0", "sipp.max_concurrent"),
        ("[sipp]\ntransport = 'sctp'", "sipp.transport"),
        ("[[kamailio]]\nevapi = 'nohost'", "kamailio[0].evapi"),
        ("[[kamailio]]\nevapi = '1.2.3.4:99999'", "kamailio[0].evapi"),
        ("[[kamailio]]\nname='a'\n[[kamailio]]\nname='a'\nevapi='127.0.0.1:1'", "kamailio"),
        ("log_level = 'loud'", "log_level"),
        ("surprise = 1", "surprise"),
        ("engine = 3", "engine"),
        ("[capture]\nkeep = 3", "capture.folder"),
        ("[capture]\nfolder = '/tmp/x'\nkeep = 0", "capture.keep"),
        ("[redis]\nurl = 'http://127.0.0.1:6379'", "redis.url"),
        ("[redis]\nurl = 'redis://127.0.0.1:6379/zero'", "redis.url"),
        ("[redis]\nhost = '127.0.0.1'", "redis.host"),
        ("[push]\nexpiration = -1", "push.expiration"),
        ("[push.apns]\nexpiration = 30", "push.apns.expiration"),  # one setting now: push.expiration
        ("[push.fcm]\nttl = 30", "push.fcm.ttl"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.key == key


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[engine\n"))


def test_node_specs() -> None:
    n = parse_node("edge1=10.0.0.1:8448,sip=10.0.0.1:5080")
    assert (n.name, n.evapi_host, n.evapi_port, n.sip_host, n.sip_port) == ("edge1", "10.0.0.1", 8448, "10.0.0.1", 5080)
    n = parse_node("127.0.0.1:8448")
    assert (n.name, n.sip_host, n.sip_port) == ("127.0.0.1:8448", "127.0.0.1", 5060)
    assert parse_hostport("[::1]:8448", "k") == ("::1", 8448)
    for bad in ["", "host", "::1:8448", "a=b=c:1", "h:1,tls=x", "bad name=h:1", "[::1"]:
        with pytest.raises(ConfigError):
            parse_node(bad)


def test_cli_config_error_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[engine]\nwindow = 'x'\n")
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "engine.window" in err


def test_run_without_a_node_is_an_error_not_a_guess(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--metrics", "off"]) == 2
    err = capsys.readouterr().err
    assert "no Kamailio node" in err and "--kamailio" in err


def test_run_help_describes_the_command_its_defaults_and_node_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "give every device that registers too late for its call the call it missed" in text
    assert "NAME must be the EVW_NODE" in text and "--kamailio replaces them" in text
    for default in ["default 15", "default start", "default 1000", "default info", "default 127.0.0.1:9848"]:
        assert default in text, default


def test_cli_bad_flag_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--kamailio", "nohost"]) == 2
    assert "--kamailio" in capsys.readouterr().err
    assert main(["run", "--window", "-3"]) == 2
    assert "--window" in capsys.readouterr().err
    assert main(["run", "--sipp", "/nonexistent/sipp"]) == 2
    assert "sip-tester" in capsys.readouterr().err


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert "evapi-worker" in capsys.readouterr().out


def test_run_flags_reach_the_config(tmp_path: Path) -> None:
    from evapi_worker.cli import build_config, build_parser

    args = build_parser().parse_args(
        [
            "run",
            "--capture",
            str(tmp_path / "cap"),
            "--state",
            str(tmp_path / "s"),
            "--metrics",
            "off",
            "--window",
            "30",
        ]
    )
    config = build_config(args)
    assert config.capture is not None and config.capture.folder == tmp_path / "cap"
    assert config.state_file == tmp_path / "s"
    assert config.metrics is None
    assert config.engine.window == 30


EXAMPLE = Path(__file__).parent.parent.parent / "deploy" / "evapi-worker.toml"


def test_the_example_settings_file_loads_as_shipped() -> None:
    cfg = load_config(EXAMPLE)
    assert [n.name for n in cfg.nodes] == ["edge1", "edge2"]
    assert cfg.evapi.ping_interval == 5.0 and cfg.action_queue == 10000
    assert cfg.capture is not None and cfg.capture.keep == 48


def test_the_documented_settings_example_is_the_example_file_and_loads(tmp_path: Path) -> None:
    doc = (Path(__file__).parent.parent.parent / "docs" / "configuration.md").read_text()
    block = doc.split("```toml\n", 1)[1].split("```\n", 1)[0]
    assert block == EXAMPLE.read_text()
    (tmp_path / "doc.toml").write_text(block)
    assert load_config(tmp_path / "doc.toml") == load_config(EXAMPLE)


@pytest.mark.parametrize(
    "toml",
    [
        "[engine]\nwindow = nan\n",
        "[engine]\ndeadline = inf\n",
        "shutdown_grace = nan\n",
        "[evapi]\nreconnect_max = nan\n",
        "[evapi]\nack_timeout = inf\n",
    ],
)
def test_non_finite_numbers_are_refused_at_load(tmp_path: Path, toml: str) -> None:
    path = tmp_path / "w.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match="finite"):
        load_config(path)


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_window_flag_must_be_finite(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--kamailio", "127.0.0.1:8448", "--window", value]) == 2
    err = capsys.readouterr().err
    assert "--window" in err and len(err.strip().splitlines()) == 1


def _fake_sipp(tmp_path: Path) -> str:
    binary = tmp_path / "sipp"
    binary.write_text("#!/bin/sh\nexit 0\n")
    binary.chmod(0o755)
    return str(binary)


@pytest.mark.parametrize(
    ("flags", "key"),
    [
        (["--state", "/nonexistent-folder/state.msgpack"], "state_file"),
        (["--capture", "/proc/evapi-worker-capture"], "capture.folder"),
        (["--metrics", "BUSY"], "metrics"),
    ],
)
def test_start_up_problems_are_one_line_and_exit_2_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], key: str
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        flags = [f"127.0.0.1:{port}" if f == "BUSY" else f for f in flags]
        code = main(["run", "--kamailio", "127.0.0.1:1", "--sipp", _fake_sipp(tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and key in err, err


_APNS = "[push.apns]\nkey_file = '/k.p8'\nkey_id = 'ABC123DEFG'\nteam_id = 'TEAM123456'\n"


def test_a_push_that_can_arrive_after_the_worker_forgets_its_call_is_refused(tmp_path: Path) -> None:
    # 60 s of retries + 30 s kept by Apple + a 15 s window fit in 180 s of ringing remembered.
    assert load_config(write(tmp_path, _APNS)).push.expiration == 30
    with pytest.raises(ConfigError, match=r"120 s after the call's start, past engine.ring_timeout \(100 s\)") as info:
        load_config(write(tmp_path, "[engine]\nring_timeout = 100\n[push]\nexpiration = 45\n" + _APNS))
    assert info.value.key == "push.expiration"
    # Without push credentials the worker sends no push: nothing to check.
    assert load_config(write(tmp_path, "[engine]\nring_timeout = 10\n")).engine.ring_timeout == 10
