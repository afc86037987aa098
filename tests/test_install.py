"""`install`, `uninstall` and `check` as far as they go without a running
systemd (the booted-container stage of .ci/run installs for real): the unit
install writes is the repository's, the config it writes parses to the
defaults, --dry-run changes nothing, and check says what is wrong."""

import pathlib

import aibutler
from conftest import ROOT, SECRET


def test_the_unit_install_writes_is_the_repositorys():
    assert aibutler.render_unit() == (ROOT / "aibutler.service").read_text()
    moved = aibutler.render_unit("/srv/butler", "/srv/butler/config.ini")
    assert "ExecStart=/usr/bin/python3 -m aibutler run --config /srv/butler/config.ini" in moved
    assert "PYTHONPATH=/srv/butler " in moved and "/opt/aibutler" not in moved


def test_the_config_install_writes_is_every_default(tmp_path):
    path = tmp_path / "config.ini"
    path.write_text(aibutler.example_config())
    written = aibutler.load_config(str(path), env={}, data_dir=str(tmp_path))
    assert aibutler.config_changes(aibutler.load_config(None, env={}, data_dir=str(tmp_path)),
                                   written) == []
    for section, keys in aibutler.CONFIG_SCHEMA.items():  # each key shown, for the user
        assert f"[{section}]" in path.read_text()
        assert all(f"\n#{key} = " in path.read_text() for key in keys)


def test_dry_runs_print_every_step_and_change_nothing(daemon, tmp_path):
    d = daemon(secret=None)
    prefix, config = tmp_path / "opt", tmp_path / "etc" / "config.ini"
    result = d.cli("install", "--dry-run", "--prefix", str(prefix), "--config", str(config),
                   check=False)
    lines = result.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("would ")
            and not line.startswith("would stop")] == [
        "copy", "run:", "write", "write", "write", "run:", "run:", "run:"]
    assert f"would write {config}" in result.stdout and "systemctl enable aibutler" in result.stdout
    result = d.cli("uninstall", "--dry-run", "--purge", "--prefix", str(prefix), check=False)
    assert result.returncode == 0 and "would be uninstalled" in result.stdout
    assert not prefix.exists() and not config.exists()


def test_check_says_what_is_wrong_and_exits_1_only_on_a_failure(daemon, receiver):
    d = daemon()
    result = d.cli("check", "--config", str(d.config), check=False)
    assert result.returncode == 0, result.stdout
    assert [line.split()[1] for line in result.stdout.splitlines()] == [
        "config:", "data:", "secret:", "port:", "model:", "clock:", "disk:"]
    assert SECRET not in result.stdout
    dead = receiver([(500, {}, b'{"error": {"message": "model is loading"}}', 0)])
    d.config.write_text(f"[agent]\nprovider = openai\nbase_url = {dead.url}/v1\nmax_steps = 1\n"
                        "[channels.webhook]\noutbound_url = http://127.0.0.1:9/callback\n")
    d.vault.set("openai_api_key", "sk-test-key-0123456789")
    result = d.cli("check", "--config", str(d.config), check=False)
    assert result.returncode == 1
    lines = {line.split()[1].rstrip(":"): line for line in result.stdout.splitlines()}
    assert lines["model"].startswith("fail") and "model is loading" in lines["model"]
    assert lines["callbacks"].startswith("fail") and "127.0.0.1:9" in lines["callbacks"]
    assert "sk-test-key" not in result.stdout
    d.config.write_text("[agent]\ntemperature = hot\n")
    result = d.cli("check", "--config", str(d.config), check=False)
    assert result.returncode == 78 and "expected a number from 0 to 2" in result.stdout
    d.config.write_text("")
    d.start()  # the port held by the running daemon is fine
    d.config.write_text(f"[server]\nport = {d.port}\n")
    result = d.cli("check", "--config", str(d.config), check=False)
    assert "held by the running aibutler" in result.stdout and result.returncode == 0
    assert d.stop() == 0


def test_install_needs_root_and_systemd_and_says_so(daemon):
    d = daemon(secret=None)
    result = d.cli("install", "--prefix", str(pathlib.Path(d.folder) / "opt"), check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "needs root" in result.stderr or "systemd is not running" in result.stderr


def test_a_pending_callback_can_be_dropped_and_a_reload_names_what_changed(daemon):
    import signal
    d = daemon("[channels.webhook]\noutbound_url = http://127.0.0.1:9/callback\n"
               "[delivery]\nretry_schedule = 1h\n")
    d.start()
    accepted = d.post({"user_id": "u", "message": "what is 1 + 1?"})[2]
    d.wait_log(f"delivery {accepted['message_id']}: attempt 1 failed")
    d.config.write_text("[channels.webhook]\noutbound_url = http://127.0.0.1:9/callback\n"
                        "[delivery]\nretry_schedule = 1h\n[agent]\nmax_steps = 3\n")
    d.proc.send_signal(signal.SIGHUP)
    d.wait_log(r"reload: config re-read from \S+; changed: \[agent\] max_steps\n")
    assert d.stop() == 0
    listing = d.cli("deliveries", "list").stdout
    assert accepted["message_id"] in listing and "pending" in listing
    result = d.cli("deliveries", "drop", accepted["message_id"])
    assert "dropped 1" in result.stderr
    assert d.cli("deliveries", "drop", accepted["message_id"], check=False).returncode == 1
    assert "no deliveries" in d.cli("deliveries", "list").stderr
