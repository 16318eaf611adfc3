"""sidecar_config: units, secret references, models, loader errors and the effective-config dump."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import pickle
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from sidecar_config import (
    AuthConfig,
    ByteSize,
    ConfigError,
    Duration,
    Endpoint,
    EndpointField,
    RegionConfig,
    SecretContext,
    SecretResolutionError,
    SidecarConfig,
    UpstreamConfig,
    UserConfig,
    dump_effective,
    format_duration,
    load_config,
    parse_bytesize,
    parse_config,
    parse_duration,
    register_resolver,
    registered_prefixes,
    resolve_secrets,
    unregister_resolver,
)

# A complete example configuration, as an operator would write it.
EXAMPLE_CONFIG = """\
listen: 127.0.0.1:6432
metrics_listen: 127.0.0.1:9930        # GET /metrics, /healthz, /readyz
admin_users: [postgres]               # may use the admin console (database `pgsidecar`)
pool:
  mode: session                       # session | transaction
  size: 20                            # server connections per (user, database)
  max_clients: 1000
auth:
  method: scram-sha-256               # trust | md5 | scram-sha-256 | passthrough
  users:
    - {name: cafeapp, password: env:CAFE_DB_PASSWORD}
upstream:
  topology: static                    # static | aurora | aurora-global
  tls: prefer                         # disable | prefer | require | verify-full (+ ca_file)
  regions:                            # ordered: the first is home
    - name: us-east-1
      hosts: [127.0.0.1:55432, 127.0.0.1:55433]
    - name: us-west-2
      hosts: [127.0.0.1:55434]
failover:
  check_interval: 250ms
  hold_timeout: 30s
spool:
  backend: sqlite                     # none | sqlite | dynamodb
  path: ./pgsidecar-spool.db
  dynamodb: {table: pgsidecar-spool, region: us-east-1, endpoint_url: null}
"""

SECRET = "s3cr3t-Pa55word-xyzzy"


def minimal(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"upstream": {"regions": [{"name": "home", "hosts": ["127.0.0.1:5432"]}]}}
    data.update(overrides)
    return data


def config_error(data: dict[str, Any], **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.yaml", **kwargs)
    return info.value


def problem_lines(err: ConfigError) -> list[str]:
    return str(err).splitlines()[1:]


def scram_verifier(password: str, salt: bytes = b"0123456789abcdef", iterations: int = 4096) -> str:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    salt_b64, stored_b64, server_b64 = (
        base64.b64encode(part).decode() for part in (salt, stored_key, server_key)
    )
    return f"SCRAM-SHA-256${iterations}:{salt_b64}${stored_b64}:{server_b64}"


# --- defaults and the documented example ----------------------------------------------------------


def test_defaults() -> None:
    cfg = parse_config(minimal())
    assert cfg.listen == Endpoint("127.0.0.1", 6432)
    assert cfg.metrics_listen == Endpoint("127.0.0.1", 9930)
    assert cfg.admin_users == ["postgres"]
    assert (cfg.log_format, cfg.log_level, cfg.shutdown_timeout) == ("text", "info", 30.0)
    pool = cfg.pool
    assert (pool.mode, pool.size, pool.min_idle, pool.max_clients) == ("session", 20, 0, 1000)
    assert (pool.checkout_timeout, pool.server_idle_timeout, pool.server_lifetime) == (30.0, 600.0, 3600.0)
    assert (pool.server_check_after_idle, pool.max_prepared_statements) == (30.0, 200)
    assert (pool.max_concurrent_connects, pool.reset_query) == (4, "DISCARD ALL")
    assert (cfg.auth.method, cfg.auth.users) == ("scram-sha-256", [])
    up = cfg.upstream
    assert (up.topology, up.tls, up.ca_file, up.connect_timeout, up.iam_auth) == (
        "static",
        "prefer",
        None,
        5.0,
        False,
    )
    assert (up.probe_user, up.probe_database) == (None, "postgres")
    assert up.home_region.name == "home"
    assert (cfg.failover.check_interval, cfg.failover.hold_timeout, cfg.failover.probe_timeout) == (
        0.25,
        30.0,
        1.0,
    )
    spool = cfg.spool
    assert (spool.backend, spool.path, spool.tables, spool.max_drain_hold) == (
        "sqlite",
        Path("./pgsidecar-spool.db"),
        None,
        30.0,
    )
    ddb = spool.dynamodb
    assert (ddb.table, ddb.region, ddb.endpoint_url, ddb.create_table) == (
        "pgsidecar-spool",
        "us-east-1",
        None,
        True,
    )
    assert cfg.limits.max_message_size == 64 * 1024 * 1024
    assert cfg.limits.client_login_timeout == 15.0
    assert cfg.client_tls is None


def test_design_example_parses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CAFE_DB_PASSWORD", SECRET)
    path = tmp_path / "sidecar.yaml"
    path.write_text(EXAMPLE_CONFIG)
    cfg = load_config(path)
    assert cfg.listen == Endpoint("127.0.0.1", 6432)
    assert [r.name for r in cfg.upstream.regions] == ["us-east-1", "us-west-2"]
    assert cfg.upstream.regions[0].hosts == [Endpoint("127.0.0.1", 55432), Endpoint("127.0.0.1", 55433)]
    assert cfg.failover.check_interval == 0.25
    assert cfg.failover.hold_timeout == 30.0
    user = cfg.auth.user("cafeapp")
    assert user is not None and user.password is not None
    assert user.password.get_secret_value() == SECRET
    assert user.password_kind == "plain"
    # The topology probe defaults to the first configured user.
    assert cfg.upstream.probe_user == "cafeapp"


def test_explicit_probe_user_is_kept() -> None:
    cfg = parse_config(
        minimal(
            auth={"method": "trust", "users": [{"name": "app"}]},
            upstream={"probe_user": "monitor", "regions": [{"name": "r", "hosts": ["h:1"]}]},
        )
    )
    assert cfg.upstream.probe_user == "monitor"


def test_probe_user_default_does_not_mutate_caller_model() -> None:
    upstream = UpstreamConfig(regions=[RegionConfig(name="r", hosts=[Endpoint("h", 1)])])
    cfg = SidecarConfig(upstream=upstream, auth=AuthConfig(method="trust", users=[UserConfig(name="app")]))
    assert cfg.upstream.probe_user == "app"
    assert upstream.probe_user is None


# --- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("0.5h", 1800.0),
        ("100ms", 0.1),
        ("30", 30.0),
        (" 2 s ", 2.0),
        (0, 0.0),
        (30, 30.0),
        (0.25, 0.25),
    ],
)
def test_duration_parses(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "bad", ["-1s", "-5", -1, "abc", "10x", "", "1.5.2s", "s", "1e3s", True, None, [1], float("nan")]
)
def test_duration_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_negative_duration_error_says_so() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_duration("-250ms")


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False))
def test_duration_format_round_trips(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=10**9))
def test_duration_units_agree(n: int) -> None:
    assert parse_duration(f"{n}ms") == n / 1000
    assert parse_duration(f"{n}s") == parse_duration(n) == float(n)
    assert parse_duration(f"{n}m") == n * 60.0
    assert parse_duration(f"{n}h") == n * 3600.0


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (30.0, "30s"), (300.0, "5m"), (3600.0, "1h"), (1.5, "1.5s"), (0, "0s")],
)
def test_duration_format_is_readable(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_duration_in_a_model() -> None:
    class M(BaseModel):
        d: Duration

    assert M.model_validate({"d": "250ms"}).d == 0.25
    with pytest.raises(ValidationError):
        M.model_validate({"d": "soon"})


# --- byte sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64MiB", 64 * 1024**2),
        ("512KiB", 512 * 1024),
        ("1GiB", 1024**3),
        ("10MB", 10_000_000),
        ("100kB", 100_000),
        ("1.5KiB", 1536),
        ("2048", 2048),
        ("7B", 7),
        (4096, 4096),
        (4096.0, 4096),
    ],
)
def test_bytesize_parses(text: Any, size: int) -> None:
    assert parse_bytesize(text) == size


@pytest.mark.parametrize("bad", ["-1KiB", -5, "12 parsecs", "1.3B", "1mb", "KiB", True, 1.5, None])
def test_bytesize_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        parse_bytesize(bad)


def test_bytesize_in_a_model() -> None:
    class M(BaseModel):
        n: ByteSize

    assert M.model_validate({"n": "1KiB"}).n == 1024


def test_message_size_bounds() -> None:
    assert parse_config(minimal(limits={"max_message_size": "1KiB"})).limits.max_message_size == 1024
    assert parse_config(minimal(limits={"max_message_size": "1GiB"})).limits.max_message_size == 1024**3
    lines = problem_lines(config_error(minimal(limits={"max_message_size": "1000B"})))
    assert lines == ["limits.max_message_size: Input should be greater than or equal to 1024 (got '1000B')"]
    assert problem_lines(config_error(minimal(limits={"max_message_size": "2GiB"})))[0].startswith(
        "limits.max_message_size: Input should be less than or equal to 1073741824"
    )


# --- endpoints ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port", "shown"),
    [
        ("127.0.0.1:6432", "127.0.0.1", 6432, "127.0.0.1:6432"),
        ("db.example.com:5432", "db.example.com", 5432, "db.example.com:5432"),
        ("[::1]:6432", "::1", 6432, "[::1]:6432"),
        ("[2001:db8::7]:1", "2001:db8::7", 1, "[2001:db8::7]:1"),
        ("[fe80::1%eth0]:65535", "fe80::1%eth0", 65535, "[fe80::1%eth0]:65535"),
        (" localhost:5432 ", "localhost", 5432, "localhost:5432"),
    ],
)
def test_endpoint_parses(text: str, host: str, port: int, shown: str) -> None:
    endpoint = Endpoint.parse(text)
    assert (endpoint.host, endpoint.port, str(endpoint)) == (host, port, shown)


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("localhost", "missing port"),
        ("[::1]", "missing port"),
        ("::1:5432", "must be in brackets"),
        ("host:0", "1 to 65535"),
        ("host:65536", "1 to 65535"),
        ("host:http", "1 to 65535"),
        (":5432", "missing host"),
        ("[::1:5432", "unclosed"),
        ("[127.0.0.1]:5432", "only for IPv6"),
        ("[zz::1]:5432", "invalid IPv6"),
        ("bad host:5432", "invalid host"),
    ],
)
def test_endpoint_rejects(bad: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        Endpoint.parse(bad)


def test_bare_host_error_names_expected_form() -> None:
    with pytest.raises(ValueError) as info:
        Endpoint.parse("db.internal")
    assert "host:port" in str(info.value)
    assert "[::1]:6432" in str(info.value)


def test_endpoint_constructor_validates() -> None:
    with pytest.raises(ValueError):
        Endpoint("h", 0)
    with pytest.raises(ValueError):
        Endpoint("[::1]", 5432)


@given(st.ip_addresses(), st.integers(min_value=1, max_value=65535))
def test_endpoint_round_trips(address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    endpoint = Endpoint(str(address), port)
    assert Endpoint.parse(str(endpoint)) == endpoint


def test_endpoint_field_in_a_model() -> None:
    class M(BaseModel):
        at: EndpointField

    m = M.model_validate({"at": "[::1]:6432"})
    assert m.at == Endpoint("::1", 6432)
    assert m.model_dump() == {"at": "[::1]:6432"}
    assert M(at=Endpoint("h", 1)).at == Endpoint("h", 1)
    with pytest.raises(ValidationError):
        M.model_validate({"at": 6432})


def test_ipv6_listen_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text('listen: "[::1]:6432"\nupstream: {regions: [{name: r, hosts: ["[::1]:5432"]}]}\n')
    cfg = load_config(path)
    assert cfg.listen == Endpoint("::1", 6432)
    assert str(cfg.upstream.regions[0].hosts[0]) == "[::1]:5432"


def test_unquoted_ipv6_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("listen: [::1]:6432\n")
    with pytest.raises(ConfigError, match="IPv6 endpoint must be quoted"):
        load_config(path)


# --- secret references --------------------------------------------------------------------------


def test_env_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGS_TEST_PW", SECRET)
    cfg = parse_config(minimal(auth={"users": [{"name": "app", "password": "env:PGS_TEST_PW"}]}))
    user = cfg.auth.user("app")
    assert user is not None and user.password is not None
    assert user.password.get_secret_value() == SECRET


def test_env_reference_works_in_any_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGS_TEST_SIZE", "7")
    monkeypatch.setenv("PGS_TEST_LISTEN", "0.0.0.0:7432")
    cfg = parse_config(minimal(pool={"size": "env:PGS_TEST_SIZE"}, listen="env:PGS_TEST_LISTEN"))
    assert cfg.pool.size == 7
    assert cfg.listen == Endpoint("0.0.0.0", 7432)


def test_missing_env_var_names_the_var(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGS_TEST_ABSENT", raising=False)
    err = config_error(minimal(auth={"users": [{"name": "app", "password": "env:PGS_TEST_ABSENT"}]}))
    assert problem_lines(err) == ["auth.users[0].password: environment variable PGS_TEST_ABSENT is not set"]
    assert err.problems[0].path == "auth.users[0].password"


def test_file_secret_strips_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(SECRET + "\n")
    data = minimal(auth={"users": [{"name": "app", "password": f"file:{tmp_path / 'pw'}"}]})
    user = parse_config(data).auth.user("app")
    assert user is not None and user.password is not None
    assert user.password.get_secret_value() == SECRET


def test_file_secret_keeps_inner_whitespace(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(" a b \r\n")
    assert resolve_secrets({"p": "file:pw"}, SecretContext(tmp_path)).value == {"p": " a b "}


def test_relative_file_secret_is_relative_to_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "pw").write_text(SECRET)
    (tmp_path / "conf" / "sidecar.yaml").write_text(
        "auth: {users: [{name: app, password: 'file:pw'}]}\n"
        "upstream: {regions: [{name: r, hosts: ['h:1']}]}\n"
    )
    monkeypatch.chdir(tmp_path)
    user = load_config("conf/sidecar.yaml").auth.user("app")
    assert user is not None and user.password is not None
    assert user.password.get_secret_value() == SECRET


def test_missing_secret_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    err = config_error(minimal(auth={"users": [{"name": "app", "password": f"file:{missing}"}]}))
    assert problem_lines(err) == [f"auth.users[0].password: secret file {missing} does not exist"]


def test_all_unresolvable_references_are_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGS_A", raising=False)
    monkeypatch.delenv("PGS_B", raising=False)
    err = config_error(minimal(listen="env:PGS_A", admin_users=["env:PGS_B"]))
    assert [p.path for p in err.problems] == ["listen", "admin_users[0]"]


def test_values_that_merely_contain_a_colon_are_untouched() -> None:
    # vault: is not a registered prefix (secretsmanager: is, since proxy/aws support).
    data = {"a": "db:5432", "b": ["x:y", {"c": "vault:secret/data/db"}], "d": 5}
    result = resolve_secrets(data)
    assert result.value == data
    assert result.references == {} and result.errors == []


def test_resolved_values_are_not_resolved_again(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGS_TEST_INDIRECT", "env:HOME")
    assert resolve_secrets({"p": "env:PGS_TEST_INDIRECT"}).value == {"p": "env:HOME"}


def test_custom_resolver_can_be_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_secretsmanager(ref: str, context: SecretContext) -> str:
        arn, _, key = ref.rpartition(":")
        if key != "password":
            raise SecretResolutionError(f"secret {arn} has no key {key}")
        return SECRET

    register_resolver("fakesm", fake_secretsmanager)
    try:
        assert "fakesm" in registered_prefixes()
        with pytest.raises(ValueError, match="already registered"):
            register_resolver("fakesm", fake_secretsmanager)
        ok = minimal(
            auth={"users": [{"name": "a", "password": "fakesm:arn:aws:sm:us-east-1:1:secret:x:password"}]}
        )
        user = parse_config(ok).auth.user("a")
        assert user is not None and user.password is not None
        assert user.password.get_secret_value() == SECRET
        bad = minimal(auth={"users": [{"name": "a", "password": "fakesm:arn:x:user"}]})
        assert problem_lines(config_error(bad)) == ["auth.users[0].password: secret arn:x has no key user"]
    finally:
        unregister_resolver("fakesm")
    assert "fakesm" not in registered_prefixes()


# --- field errors -------------------------------------------------------------------------------


def test_bad_field_names_dotted_path() -> None:
    err = config_error(minimal(pool={"size": 0}))
    assert problem_lines(err) == ["pool.size: Input should be greater than or equal to 1 (got 0)"]
    assert str(err).splitlines()[0] == "test.yaml: invalid configuration (1 problem)"


def test_config_error_pickles() -> None:
    err = config_error(minimal(pool={"size": 0}))
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.problems, copy.source) == (str(err), err.problems, err.source)


def test_every_problem_on_its_own_line() -> None:
    err = config_error(
        minimal(pool={"size": 0, "mode": "sesion"}, log_level="loud", failover={"hold_timeout": "x"})
    )
    lines = problem_lines(err)
    assert len(lines) == len(err.problems) == 4
    assert "pool.mode: Input should be 'session' or 'transaction' (got 'sesion')" in lines
    assert any(line.startswith("failover.hold_timeout: invalid duration") for line in lines)


def test_list_index_in_path() -> None:
    data = minimal(
        upstream={"regions": [{"name": "a", "hosts": ["h:1"]}, {"name": "b", "hosts": ["h:1", "nope"]}]}
    )
    [line] = problem_lines(config_error(data))
    assert line.startswith("upstream.regions[1].hosts[1]: missing port")
    assert line.endswith("(got 'nope')")


def test_missing_required_section() -> None:
    assert problem_lines(config_error({})) == ["upstream: Field required"]


def test_unknown_key_is_an_error() -> None:
    err = config_error(minimal(pool={"max_clint": 5}))
    assert problem_lines(err) == ["pool.max_clint: unknown key; did you mean 'max_clients'?"]
    err = config_error(minimal(spol={}))
    assert problem_lines(err) == ["spol: unknown key; did you mean 'spool'?"]
    err = config_error(minimal(failover={"zzz": 1}))
    assert problem_lines(err)[0].startswith("failover.zzz: unknown key; expected one of: check_interval")


def test_verify_full_needs_ca_file() -> None:
    regions = [{"name": "r", "hosts": ["h:1"]}]
    err = config_error(minimal(upstream={"tls": "verify-full", "regions": regions}))
    assert problem_lines(err) == ["upstream.ca_file: required when upstream.tls is verify-full"]
    cfg = parse_config(minimal(upstream={"tls": "verify-full", "ca_file": "/etc/ca.pem", "regions": regions}))
    assert cfg.upstream.ca_file == Path("/etc/ca.pem")


def test_regions_need_at_least_one_and_unique_names() -> None:
    assert problem_lines(config_error(minimal(upstream={"regions": []})))[0].startswith(
        "upstream.regions: List"
    )
    dup = [{"name": "a", "hosts": ["h:1"]}, {"name": "a", "hosts": ["h:2"]}]
    assert problem_lines(config_error(minimal(upstream={"regions": dup}))) == [
        "upstream.regions[1].name: duplicate region name (first defined at upstream.regions[0]) (got 'a')"
    ]
    no_hosts = [{"name": "a", "hosts": []}]
    assert problem_lines(config_error(minimal(upstream={"regions": no_hosts})))[0].startswith(
        "upstream.regions[0].hosts: List should have at least 1 item"
    )


def test_aurora_needs_instance_mapping() -> None:
    regions = [{"name": "a", "hosts": ["h:5432"]}]
    err = config_error(minimal(upstream={"topology": "aurora", "regions": regions}))
    assert problem_lines(err)[0].startswith("upstream.regions[0].instance_endpoint_pattern: ")
    regions[0]["instance_endpoint_pattern"] = "?.cluster-x.us-east-1.rds.amazonaws.com"
    cfg = parse_config(minimal(upstream={"topology": "aurora", "regions": regions}))
    region = cfg.upstream.regions[0]
    assert region.instance_endpoint("db-1") == Endpoint("db-1.cluster-x.us-east-1.rds.amazonaws.com", 5432)


def test_instance_endpoint_pattern_and_map() -> None:
    region = RegionConfig.model_validate(
        {
            "name": "r",
            "hosts": ["h:6000"],
            "instance_endpoint_pattern": "?.example:7000",
            "instances": {"db-2": "10.0.0.2:5432"},
        }
    )
    assert region.instance_endpoint("db-1") == Endpoint("db-1.example", 7000)
    assert region.instance_endpoint("db-2") == Endpoint("10.0.0.2", 5432)
    assert RegionConfig(name="r", hosts=[Endpoint("h", 1)]).instance_endpoint("x") is None
    with pytest.raises(ValidationError, match="must contain '\\?'"):
        RegionConfig.model_validate(
            {"name": "r", "hosts": ["h:1"], "instance_endpoint_pattern": "db.example"}
        )


def test_password_required_for_md5_and_scram() -> None:
    users = [{"name": "a", "password": SECRET}, {"name": "b"}]
    for method in ("md5", "scram-sha-256"):
        err = config_error(minimal(auth={"method": method, "users": users}))
        assert problem_lines(err) == [f"auth.users[1].password: required when auth.method is {method}"]
    for method in ("trust", "passthrough"):
        assert parse_config(minimal(auth={"method": method, "users": users})).auth.method == method


def test_user_names_unique() -> None:
    err = config_error(
        minimal(auth={"method": "trust", "users": [{"name": "a"}, {"name": "b"}, {"name": "a"}]})
    )
    assert problem_lines(err) == [
        "auth.users[2].name: duplicate user name (first defined at auth.users[0]) (got 'a')"
    ]


def test_empty_password_rejected_without_echo() -> None:
    err = config_error(minimal(auth={"method": "trust", "users": [{"name": "a", "password": ""}]}))
    assert problem_lines(err) == ["auth.users[0].password: must not be empty (got ***)"]


def test_scram_verifier_password() -> None:
    verifier = scram_verifier("pencil")
    cfg = parse_config(
        minimal(auth={"users": [{"name": "a", "password": verifier}, {"name": "b", "password": "p"}]})
    )
    a, b = cfg.auth.user("a"), cfg.auth.user("b")
    assert a is not None and b is not None
    assert (a.password_kind, b.password_kind) == ("scram-sha-256", "plain")
    parsed = a.scram_verifier
    assert parsed is not None and parsed.iterations == 4096 and parsed.salt == b"0123456789abcdef"
    assert len(parsed.stored_key) == len(parsed.server_key) == 32
    assert "stored_key" not in repr(parsed)
    assert b.scram_verifier is None
    assert cfg.auth.user("nobody") is None


def test_malformed_scram_verifier_rejected() -> None:
    bad = scram_verifier("pencil")[:-8]
    err = config_error(minimal(auth={"users": [{"name": "a", "password": bad}]}))
    [line] = problem_lines(err)
    assert line.startswith("auth.users[0].password: malformed SCRAM verifier")
    assert bad not in str(err)


def test_md5_cannot_use_scram_verifier() -> None:
    err = config_error(
        minimal(auth={"method": "md5", "users": [{"name": "a", "password": scram_verifier("x")}]})
    )
    assert problem_lines(err)[0].startswith("auth.users[0].password: a SCRAM verifier cannot be used with")


def test_other_cross_field_checks() -> None:
    assert problem_lines(config_error(minimal(pool={"size": 2, "min_idle": 3}))) == [
        "pool.min_idle: must not exceed pool.size (2) (got 3)"
    ]
    assert problem_lines(config_error(minimal(metrics_listen="127.0.0.1:6432"))) == [
        "metrics_listen: must differ from listen (got '127.0.0.1:6432')"
    ]
    assert problem_lines(config_error(minimal(spool={"tables": []})))[0].startswith(
        "spool.tables: must not be empty"
    )
    regions = [{"name": "r", "hosts": ["h:1"]}]
    assert problem_lines(
        config_error(minimal(upstream={"iam_auth": True, "tls": "disable", "regions": regions}))
    )[0].startswith("upstream.tls: IAM authentication needs TLS")


def test_client_tls_needs_both_files() -> None:
    assert problem_lines(config_error(minimal(client_tls={"cert_file": "/c.pem"}))) == [
        "client_tls.key_file: Field required"
    ]
    cfg = parse_config(minimal(client_tls={"cert_file": "/c.pem", "key_file": "/k.pem"}))
    assert cfg.client_tls is not None and cfg.client_tls.key_file == Path("/k.pem")


def test_metrics_can_be_disabled() -> None:
    assert parse_config(minimal(metrics_listen=None)).metrics_listen is None


# --- loading files ------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert str(tmp_path / "absent.yaml") in str(info.value)
    assert "not found" in str(info.value)


def test_yaml_syntax_error_has_line_number(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"auth:\n  users:\n    - {{name: a, password: {SECRET}\npool:\n  size: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line 4" in str(info.value) or "line 5" in str(info.value)
    assert "YAML syntax error" in str(info.value)
    # PyYAML's own message quotes the source line; ours must not, nor chain the YAML exception.
    assert SECRET not in str(info.value)
    assert info.value.__context__ is None and info.value.__cause__ is None


@pytest.mark.parametrize(
    ("content", "says"), [("- a\n- b\n", "must be a mapping"), ("", "empty"), ("42\n", "mapping")]
)
def test_top_level_must_be_a_mapping(tmp_path: Path, content: str, says: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=says):
        load_config(path)


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("pool:\n  size: 2\n  size: 3\n")
    with pytest.raises(ConfigError, match=r"line 3.*duplicate key 'size'"):
        load_config(path)


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upstream:\n  regions:\n    - &r {name: a, hosts: ['h:1']}\n    - {<<: *r, name: b}\n")
    cfg = load_config(path)
    assert [r.name for r in cfg.upstream.regions] == ["a", "b"]


def test_parse_config_rejects_non_mapping() -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_config(["a"], "x")  # type: ignore[arg-type]


# --- secrets never leak -------------------------------------------------------------------------


def _secret_config(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("PGS_TEST_PW", SECRET)
    return minimal(
        auth={
            "method": "md5",
            "users": [
                {"name": "env_user", "password": "env:PGS_TEST_PW"},
                {"name": "literal_user", "password": SECRET + "-literal"},
            ],
        }
    )


def test_dump_effective_hides_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse_config(_secret_config(monkeypatch))
    dumped = dump_effective(cfg)
    assert SECRET not in dumped
    data = yaml.safe_load(dumped)
    assert [u["password"] for u in data["auth"]["users"]] == ["***", "***"]


def test_dump_effective_fills_defaults_and_round_trips() -> None:
    cfg = parse_config(
        minimal(
            listen="[::1]:7000",
            failover={"check_interval": "250ms", "hold_timeout": "1m"},
            auth={"method": "trust", "users": [{"name": "app"}]},
            upstream={
                "tls": "verify-full",
                "ca_file": "/ca.pem",
                "regions": [{"name": "r", "hosts": ["h:1"]}],
            },
        )
    )
    data = yaml.safe_load(dump_effective(cfg))
    assert data["listen"] == "[::1]:7000"
    assert data["failover"] == {
        "check_interval": 0.25,
        "hold_timeout": 60.0,
        "probe_timeout": 1.0,
        "transaction_replay": True,
        "replay_max_bytes": 1048576,
        "commit_outcome_timeout": 300.0,
        "commit_outcome": "marker",
    }
    assert data["pool"]["reset_query"] == "DISCARD ALL"
    assert data["limits"]["max_message_size"] == 64 * 1024 * 1024
    assert data["upstream"]["ca_file"] == "/ca.pem"
    assert data["upstream"]["probe_user"] == "app"
    assert parse_config(data) == cfg


def test_config_error_hides_secrets_in_wrong_places(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _secret_config(monkeypatch)
    # A resolved secret landing in a non-secret field, a literal secret under a misspelt key, and
    # secret fields that fail validation for other reasons.
    data["listen"] = "env:PGS_TEST_PW"
    data["admin_users"] = ["env:PGS_TEST_PW", 5]
    data["auth"]["users"].append({"name": "c", "pasword": SECRET})
    data["auth"]["users"].append({"name": "d", "password": [SECRET]})
    data["pool"] = {"reset_query": ["env:PGS_TEST_PW"]}
    err = config_error(data)
    text = str(err)
    assert SECRET not in text
    lines = problem_lines(err)
    assert any(line.startswith("listen:") and line.endswith("(got 'env:PGS_TEST_PW')") for line in lines)
    assert "auth.users[2].pasword: unknown key; did you mean 'password'?" in lines
    assert "auth.users[3].password: Input should be a valid string (got ***)" in lines


def test_config_error_hides_secret_from_cross_field_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _secret_config(monkeypatch)
    data["auth"]["users"].append({"name": "nopw"})
    err = config_error(data)
    assert problem_lines(err) == ["auth.users[2].password: required when auth.method is md5"]
    assert SECRET not in str(err)


@given(
    st.text(alphabet=st.characters(whitelist_categories=("Lu", "Ll")), min_size=6, max_size=40),
    st.sampled_from(["listen", "log_level", "shutdown_timeout", "admin_users"]),
)
def test_resolved_secret_never_in_error(secret: str, field: str) -> None:
    # A registered fake stands in for an env var: monkeypatch is function-scoped and would not be
    # reset between hypothesis examples. Letters only, so that pool.size always fails to validate.
    register_resolver("pgstest", lambda ref, ctx: secret, replace=True)
    try:
        data = minimal(**{field: "pgstest:x"})
        if field == "admin_users":
            data[field] = ["pgstest:x", ""]
        data["pool"] = {"size": "pgstest:x"}
        with pytest.raises(ConfigError) as info:
            parse_config(data)
        assert secret not in str(info.value)
    finally:
        unregister_resolver("pgstest")


def test_secret_str_repr_hides_value() -> None:
    user = UserConfig(name="a", password=SECRET)  # type: ignore[arg-type]
    assert SECRET not in repr(user)
    assert SECRET not in str(AuthConfig(users=[user]))


@pytest.fixture
def yaml_file(tmp_path: Path) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            auth:
              users:
                - name: app
                  password: {SECRET}
            pool:
              size: nope
            upstream:
              regions: [{{name: r, hosts: ["h:1"]}}]
            """
        )
    )
    return path


def test_load_config_error_from_file_hides_literal_secret(yaml_file: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(yaml_file)
    assert SECRET not in str(info.value)
    assert info.value.source == str(yaml_file)
    assert [p.path for p in info.value.problems] == ["pool.size"]
    assert info.value.__context__ is None


def test_transaction_continuity_defaults_and_bounds() -> None:
    failover = parse_config(minimal()).failover
    assert failover.transaction_replay is True
    assert failover.replay_max_bytes == 1024**2
    assert failover.commit_outcome == "marker"
    tuned = parse_config(
        minimal(failover={"transaction_replay": False, "replay_max_bytes": "64KiB", "commit_outcome": "off"})
    ).failover
    assert (tuned.transaction_replay, tuned.replay_max_bytes, tuned.commit_outcome) == (False, 65536, "off")
    lines = problem_lines(config_error(minimal(failover={"replay_max_bytes": "100B"})))
    assert lines == ["failover.replay_max_bytes: Input should be greater than or equal to 1024 (got '100B')"]
    lines = problem_lines(config_error(minimal(failover={"replay_max_bytes": "2GiB"})))
    assert lines[0].startswith("failover.replay_max_bytes: Input should be less than or equal to 1073741824")
    lines = problem_lines(config_error(minimal(failover={"commit_outcome": "xid"})))
    assert lines[0].startswith("failover.commit_outcome: Input should be 'marker' or 'off'")
    assert failover.commit_outcome_timeout == 300.0
    waited = parse_config(minimal(failover={"commit_outcome_timeout": "2m"})).failover
    assert waited.commit_outcome_timeout == 120.0
    lines = problem_lines(config_error(minimal(failover={"commit_outcome_timeout": -1})))
    assert lines == ["failover.commit_outcome_timeout: a duration must not be negative (got -1)"]
    lines = problem_lines(config_error(minimal(failover={"commit_outcome_timeout": "2h"})))
    assert lines[0].startswith("failover.commit_outcome_timeout: Input should be less than or equal to 1800")
