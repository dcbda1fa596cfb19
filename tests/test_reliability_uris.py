"""Issue 19 items 4, 5, 6, 13a: storage and tracking URIs are checked for what they are, fail fast
naming their flag before anything is created, and no credential is ever printed.

- `--storage` / `--store` URIs: a remote store is probed in a child process with a deadline (an
  S3 endpoint that never answers, no credentials, a closed port, a missing bucket: seconds).
- `--tracking-uri`: unknown schemes, files that are not MLflow databases, http servers that are
  not MLflow, database servers that are down; user:password@ reaches a real MLflow server.
- Redaction parses URIs (userinfo up to the last '@', query and fragment values) and masks the
  command's own secrets wherever a library echoes them.

Servers are local and in-process: http.server stand-ins, MLflow's own Flask app, moto's S3.
"""
from __future__ import annotations

import contextlib
import http.server
import importlib.util
import json
import os
import socket
import sqlite3
import threading
from pathlib import Path

import pytest
from conftest import closed_port

from regft import store
from regft.cli import redact, redact_uri, remember_secrets, shorten
from regft.evaluate import main as evaluate
from regft.generate import main as generate
from regft.mlflow_store import check_tracking_uri, flat_params
from regft.predict import main as predict
from regft.train import main as train
from regft.tune import main as tune

# imported above, at collection: the time limits below bound the checks, not the imports
FAST_S = 30  # a bad URI is refused within this (the S3 hang it replaces lasted minutes)

# a secret of the shapes that leaked: '/' (S3 secrets are base64), '@' and ':' inside it
SECRET = "s3cr3t/Pa@ss:w0rd"
S3_KEY = "AKIAIOSFODNN7EXAMPLE"
MESSAGE_CHARS = 500
BUCKET = "regft-bucket"


# ------------------------------------------------------------------ redaction (item 6) ----

REDACT_SHAPES = [
    # (id, text, the secret that must go, what must stay)
    ("s3-secret-with-slash", f"s3://{S3_KEY}:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY@bkt/p",
     "wJalrXUtnFEMI", "@bkt/p"),
    ("password-with-at", "--tracking-uri http://me:p@ss@w0rd@127.0.0.1:5000: unreachable",
     "ss@w0rd", "127.0.0.1:5000: unreachable"),
    ("password-with-slash-colon", f"postgresql://u:{SECRET}@db:5432/mlflow", "Pa@ss", "@db:5432/mlflow"),
    ("percent-encoded", "postgresql://u:pa%40ss%2Fw0rd@db/mlflow", "pa%40ss", "@db/mlflow"),
    ("bare-token-userinfo", "https://ghp_abcdefghijklmnopqrstuvwxyz0123@github.com/o/r.git",
     "ghp_abcdef", "github.com/o/r.git"),
    ("query-token", "https://host/api?access_token=tok-123456&region=eu-west-1", "tok-123456",
     "region=eu-west-1"),
    ("query-signature", "https://b.s3.amazonaws.com/k?X-Amz-Signature=abcdef0123&X-Amz-Expires=60",
     "abcdef0123", "b.s3.amazonaws.com/k"),
    ("query-sas", "https://acct.blob.core.windows.net/c?sv=2020&sig=AbC%2Bdef123%3D", "AbC%2Bdef123", "acct"),
    ("fragment-token", "redirect to https://app/cb#access_token=frag-secret-1&state=x",
     "frag-secret-1", "https://app/cb#"),
    ("nested-uri-in-query", "s3://b/x?endpoint_override=http://u:inner-pw-99@127.0.0.1:9000",
     "inner-pw-99", "endpoint_override=http://u:"),
    ("env-assignment", "AWS_SECRET_ACCESS_KEY=env-secret-42 AWS_REGION=us-east-1", "env-secret-42",
     "AWS_REGION=us-east-1"),
    ("json-like", '{"password": "json-secret-7", "user": "bob"}', "json-secret-7", '"user": "bob"'),
    ("python-dict-repr", "{'api_key': 'dict-secret-8', 'lr': 0.1}", "dict-secret-8", "'lr': 0.1"),
    ("plain-words-stay", "unknown key: 'colour'; tokens: 77", "\x00", "unknown key: 'colour'; tokens: 77"),
    ("yaml-like", "token: yaml-secret-9\nlr: 0.1", "yaml-secret-9", "lr: 0.1"),
    ("authorization-header", "Authorization: Basic dXNlcjpwYXNzd29yZA== sent", "dXNlcjpwYXNz", "sent"),
    ("bearer-in-json", '{"Authorization": "Bearer eyJhbGciOi.x.y"}', "eyJhbGciOi", "Authorization"),
    ("quoted-in-error", f"'s3://{S3_KEY}:{SECRET}@bkt/x' is not writable", "Pa@ss", "is not writable"),
    ("aws-key-id-alone", f"key {S3_KEY} in a log line", S3_KEY, "in a log line"),
]


@pytest.mark.parametrize("text,secret,kept", [c[1:] for c in REDACT_SHAPES],
                         ids=[c[0] for c in REDACT_SHAPES])
def test_redact_masks_credentials_of_every_shape(text, secret, kept):
    out = redact(text)
    assert secret not in out, out
    assert kept in out, out  # what says where (host, path, other keys) stays readable


def test_redact_uri_keeps_the_user_and_masks_the_rest():
    assert redact_uri(f"http://me:{SECRET}@127.0.0.1:5000/x?a=1") == "http://me:***@127.0.0.1:5000/x?a=***"
    assert redact_uri("s3://bucket/prefix?region=eu-west-1") == "s3://bucket/prefix?region=eu-west-1"


def test_the_commands_own_secrets_are_masked_wherever_a_library_echoes_them():
    """A library may print the password decoded, outside any URI: the secrets of argv (and of
    the environment) are masked verbatim, percent-encoded or not."""
    remember_secrets(["--tracking-uri", "postgresql://u:echo%2Fd-pw%40x@db/m", "--token=argv-token-1"],
                     environ={"MLFLOW_TRACKING_PASSWORD": "env-pw-123", "HOME": "/home/u"})
    message = "FATAL: password authentication failed (password echo/d-pw@x); env-pw-123; argv-token-1"
    out = redact(message)
    assert "echo/d-pw@x" not in out and "env-pw-123" not in out and "argv-token-1" not in out
    assert "password authentication failed" in out
    assert redact("HOME is /home/u") == "HOME is /home/u"  # not a secret-named variable


def test_mlflow_params_are_redacted_by_parsing():
    params = flat_params({"tracking_uri": f"http://me:{SECRET}@h:5000", "note": "access_token=pt-1234567",
                          "storage": f"s3://{S3_KEY}:{SECRET}@bkt/p?x=1", "lr": 0.1})
    text = json.dumps(params)
    assert "Pa@ss" not in text and "pt-1234567" not in text and S3_KEY not in text
    assert params["lr"] == "0.1" and params["tracking_uri"] == "http://me:***@h:5000"


# --------------------------------------------------------------------- shorten ----

@pytest.mark.parametrize(
    "value",
    [
        "x" * 10_000,
        "é\n\x00" * 5_000,
        b"\xff" * 10_000,
        list(range(100_000)),
        {str(i): [i] * 100 for i in range(10_000)},
        [[[[["deep"] * 50] * 50] * 50] * 50],
        10 ** 4000,
        object(),
    ],
    ids=["long-str", "control-chars", "bytes", "long-list", "big-dict", "nested", "huge-int", "object"],
)
def test_shorten_is_short_and_one_line(value):
    text = shorten(value)
    assert len(text) < 100
    assert "\n" not in text and "\x00" not in text


def test_shorten_keeps_short_values_as_repr_and_counts_long_ones():
    assert shorten("lr") == "'lr'"
    assert shorten([1, 2]) == "[1, 2]"
    assert shorten(0.5) == "0.5"
    long = shorten("a" * 1000, limit=10)
    assert long.startswith("'aaaaaaaaa") and len(long) < 30 and "1000 chars" in long
    assert "100000 items" in shorten(list(range(100_000)))


def test_shorten_redacts_before_cutting():
    # cut at 40 characters the '@' that ends the userinfo would be gone, and the secret with it
    uri = "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY@bucket/prefix"
    text = shorten(uri, limit=40)
    assert "wJalrXUtnFEMI" not in text and "AKIAIOSFODNN7EXAMPLE" not in text


class _BadRepr:
    def __repr__(self):
        raise RuntimeError("broken")


def test_shorten_survives_a_broken_repr():
    assert "_BadRepr" in shorten(_BadRepr())


# ------------------------------------------------------------- local servers ----

class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, status: int, body: bytes, kind: str):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _OkEverywhere(_Quiet):
    """A web app with a /health endpoint (a Grafana, a Jupyter, a proxy's landing page)."""

    def do_GET(self):
        self._send(200, b"<html>OK</html>", "text/html")


class _JsonEverywhere(_Quiet):
    """Another JSON API: {"status": "ok"} on every path."""

    def do_GET(self):
        self._send(200, b'{"status": "ok"}', "application/json")


class _PlainFiles(http.server.SimpleHTTPRequestHandler):
    """python -m http.server: a directory listing, 404 on /health."""

    def log_message(self, *args):
        pass


AUTH_USER, AUTH_PASSWORD = "regft", SECRET


class _MlflowBehindBasicAuth(_Quiet):
    """MLflow's answers behind basic auth (mlflow server --app-name basic-auth answers the same)."""

    def do_GET(self):
        import base64

        good = "Basic " + base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
        if self.headers.get("Authorization") != good:
            self._send(401, b'{"error_code": "UNAUTHENTICATED"}', "application/json")
        elif self.path == "/health":
            self._send(200, b"OK", "text/plain")
        else:
            self._send(200, b'{"experiments": [{"experiment_id": "0", "name": "Default"}]}',
                       "application/json")


@contextlib.contextmanager
def serving(handler, directory: Path | None = None):
    """An http server on 127.0.0.1 in a thread; yields its port."""
    factory = handler if directory is None else (lambda *a, **k: handler(*a, directory=str(directory), **k))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), factory)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def silent_port():
    """A port that accepts TCP connections and never answers (a hung endpoint, a firewall)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield s.getsockname()[1]
    s.close()


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 with one bucket; yields its endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture
def aws_credentials(monkeypatch, tmp_path):
    """Credentials moto takes; no shared files or instance metadata to fall back on."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))


def s3_uri(endpoint: str, bucket: str = BUCKET, userinfo: str = "") -> str:
    return f"s3://{userinfo}{bucket}/store?endpoint_override={endpoint}&scheme=http"


# -------------------------------------------------------- the command lines ----

def _files(tmp_path: Path) -> dict[str, str]:
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    other = tmp_path / "shop.db"
    with contextlib.closing(sqlite3.connect(other)) as con:
        con.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
        con.commit()
    (tmp_path / "a-folder.db").mkdir()
    return {"text": str(text), "other_db": str(other), "folder_db": str(tmp_path / "a-folder.db"),
            "tmp": str(tmp_path)}


SMOKE = ["cars", "--preset", "smoke"]
# (id, --tracking-uri, text the error must contain); {port} is a closed port, {plain}/{ok}/{json}
# the stand-in web servers, {text}/{other_db}/{folder_db} files of _files
TRACKING_CASES = [
    ("unknown-scheme", "mlfow://127.0.0.1:5000", "unknown scheme 'mlfow'"),
    ("windows-style-path", "C:/runs/mlflow.db", "plain-folder"),
    ("text-file", "sqlite:///{text}", "is not an SQLite database"),
    ("sqlite-of-another-app", "sqlite:///{other_db}", "an SQLite database of something else"),
    ("sqlite-path-is-a-folder", "sqlite:///{folder_db}", "is a folder"),
    ("plain-http-server", "http://127.0.0.1:{plain}", "not an MLflow tracking server"),
    ("web-app-with-health", "http://127.0.0.1:{ok}", "not an MLflow tracking server"),
    ("json-api-not-mlflow", "http://127.0.0.1:{json}", "not an MLflow tracking server"),
    ("http-port-out-of-range", "http://127.0.0.1:99999", "bad port"),
    ("http-password-with-raw-slash", f"http://me:{SECRET}@127.0.0.1:{{port}}", "percent-encode"),
    ("http-credentials-unreachable", "http://me:s3cr3t%2Fpw@127.0.0.1:{port}", "unreachable"),
    ("postgres-down", f"postgresql://regft:{SECRET.replace('/', '%2F')}@127.0.0.1:{{port}}/mlflow",
     "database server 127.0.0.1:{port} unreachable"),
    ("mysql-down", "mysql+pymysql://regft@127.0.0.1:{port}/mlflow", "unreachable"),
]


def _stderr_checks(err: str, out: str, flag: str, expected: str) -> None:
    assert flag in err and expected in err, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert len(err) < MESSAGE_CHARS, len(err)
    for secret in (SECRET, SECRET.replace("/", "%2F"), "s3cr3t%2Fpw", "s3cr3t/pw"):
        assert secret not in err + out


def _nothing_created(tmp_path: Path) -> None:
    assert not (tmp_path / "store" / "datasets").exists()
    assert not (tmp_path / "store" / "searches").exists()
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.timeout(FAST_S)
@pytest.mark.parametrize("uri,expected", [c[1:] for c in TRACKING_CASES], ids=[c[0] for c in TRACKING_CASES])
def test_tune_refuses_a_tracking_uri_that_is_not_mlflow(uri, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    files = _files(tmp_path)
    before = {p: Path(p).read_bytes() for p in (files["text"], files["other_db"])}
    with serving(_PlainFiles, tmp_path) as plain, serving(_OkEverywhere) as ok, \
            serving(_JsonEverywhere) as js:
        ports = {"port": closed_port(), "plain": plain, "ok": ok, "json": js}
        uri, expected = uri.format(**ports, **files), expected.format(**ports)
        rc = tune([*SMOKE, "--storage", str(tmp_path / "store"), "--tracking-uri", uri])
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    _stderr_checks(captured.err, captured.out, "--tracking-uri", expected)
    _nothing_created(tmp_path)
    assert {p: Path(p).read_bytes() for p in before} == before  # the user's files untouched


STORAGE_CASES = [
    # (id, --storage (s3_uri pieces), text the error must contain)
    ("s3-endpoint-closed-port", "{closed_s3}", "not writable"),
    ("s3-endpoint-never-answers", "{silent_s3}", "did not take a test write within"),
    ("s3-no-credentials", "{nocreds}", "no AWS credentials set"),
    ("s3-missing-bucket", "{missing_bucket}", "not found"),
    ("s3-secret-with-raw-slash", "{slash_secret}", "percent-encode"),
    ("unknown-filesystem-scheme", "s4://bucket/store", "Unrecognized filesystem"),
]


@pytest.mark.timeout(FAST_S)  # the hang this guards against lasted minutes
@pytest.mark.parametrize("storage,expected", [c[1:] for c in STORAGE_CASES],
                         ids=[c[0] for c in STORAGE_CASES])
def test_tune_refuses_unusable_storage_in_seconds(storage, expected, tmp_path, monkeypatch, capsys,
                                                   s3_endpoint, aws_credentials, silent_port):
    monkeypatch.chdir(tmp_path)
    # the deadline (20 s by default), shorter: room for a real answer, little for the silent port
    monkeypatch.setattr(store, "STORAGE_CHECK_S", 4.0 if "silent" in storage else 8.0)
    if storage == "{nocreds}":
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            monkeypatch.delenv(name)
    storage = storage.format(
        closed_s3=s3_uri(f"http://127.0.0.1:{closed_port()}"),
        silent_s3=s3_uri(f"http://127.0.0.1:{silent_port}"),
        nocreds=s3_uri(s3_endpoint), missing_bucket=s3_uri(s3_endpoint, "no-such-bucket"),
        slash_secret=s3_uri(s3_endpoint, userinfo=f"{S3_KEY}:{SECRET}@"))
    rc = tune([*SMOKE, "--storage", storage, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"])
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    _stderr_checks(captured.err, captured.out, "--storage", expected)
    _nothing_created(tmp_path)


def test_a_reachable_s3_store_passes_the_check_and_keeps_nothing(s3_endpoint, aws_credentials):
    import boto3

    assert store.check_writable(s3_uri(s3_endpoint), flag="--storage") is None
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert not [k for k in keys if ".regft-write-test" in k], keys


@pytest.mark.timeout(FAST_S)
def test_generate_and_train_refuse_a_store_that_never_answers(tmp_path, monkeypatch, capsys, silent_port,
                                                               aws_credentials):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(store, "STORAGE_CHECK_S", 4.0)
    uri = s3_uri(f"http://127.0.0.1:{silent_port}")
    for main, argv, flag in ((generate, ["shapes", "--generator", "shapes", "--store", uri], "store"),
                             (train, ["shapes", "--storage", uri], "--storage")):
        rc = main(argv)
        captured = capsys.readouterr()
        assert rc == 2, captured.err
        _stderr_checks(captured.err, captured.out, flag, "did not take a test write within")
    assert not (tmp_path / "regft_data").exists() and not (tmp_path / "regft_runs").exists()


@pytest.mark.timeout(FAST_S)
@pytest.mark.parametrize("uri,expected", [c[1:] for c in TRACKING_CASES[:5]],
                         ids=[c[0] for c in TRACKING_CASES[:5]])
def test_predict_refuses_the_same_tracking_uris(uri, expected, tmp_path, monkeypatch, capsys):
    """regft.predict / regft.evaluate take --tracking-uri for models:/ and run ids: same checks."""
    monkeypatch.chdir(tmp_path)
    files = _files(tmp_path)
    uri = uri.format(**files)
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    for main, argv in ((predict, ["models:/regft-cars/1", str(image)]),
                       (evaluate, ["models:/regft-cars/1", "--real-test", str(tmp_path)])):
        rc = main([*argv, "--tracking-uri", uri])
        captured = capsys.readouterr()
        assert rc == 2, captured.err
        _stderr_checks(captured.err, captured.out, "--tracking-uri", expected)
    assert not (tmp_path / "mlflow.db").exists()


def test_a_missing_database_driver_is_named():
    if importlib.util.find_spec("pg8000") is not None:
        pytest.skip("pg8000 is installed here")
    (problem, *_) = check_tracking_uri(f"postgresql+pg8000://u@127.0.0.1:{closed_port()}/db", timeout=1)
    assert "--tracking-uri" in problem and "pg8000 is not installed (pip install pg8000)" in problem


# ------------------------------------------- user:password@ reaches the server (13a) ----

def test_credentials_in_the_uri_are_sent_as_basic_auth_not_as_a_host_name():
    with serving(_MlflowBehindBasicAuth) as port:
        good = f"http://{AUTH_USER}:{SECRET.replace('/', '%2F')}@127.0.0.1:{port}"
        assert check_tracking_uri(good) == []
        (problem,) = check_tracking_uri(f"http://{AUTH_USER}:wrong@127.0.0.1:{port}")
        assert "refused the credentials (HTTP 401)" in problem and "wrong" not in problem
        (problem,) = check_tracking_uri(f"http://127.0.0.1:{port}")
        assert "refused the credentials" in problem


def test_credentials_from_mlflows_environment_variables_are_sent(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", AUTH_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", AUTH_PASSWORD)
    with serving(_MlflowBehindBasicAuth) as port:
        assert check_tracking_uri(f"http://127.0.0.1:{port}") == []


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """MLflow's own tracking server (its Flask app) on 127.0.0.1 in a thread; yields its port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    saved = dict(os.environ)
    os.environ.update({"_MLFLOW_SERVER_FILE_STORE": f"sqlite:///{root / 'mlflow.db'}",
                       "_MLFLOW_SERVER_ARTIFACT_ROOT": str(root / "artifacts"),
                       "_MLFLOW_SERVER_SERVE_ARTIFACTS": "false"})
    from mlflow.server import app
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_port
    assert check_tracking_uri(f"http://127.0.0.1:{port}", timeout=60) == []  # creates its tables
    yield port
    server.shutdown()
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.timeout(120)
def test_predict_reaches_a_real_mlflow_server_through_user_password(mlflow_server, tmp_path, monkeypatch,
                                                                     capsys):
    """The URI's user:password used to become part of the host name ('unreachable'): now the
    server is reached and answers that the model does not exist (still exit 2, secret hidden)."""
    monkeypatch.chdir(tmp_path)
    uri = f"http://me:{SECRET.replace('/', '%2F')}@127.0.0.1:{mlflow_server}"
    assert check_tracking_uri(uri) == []
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    rc = predict(["models:/no-such-model/1", str(image), "--tracking-uri", uri])
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    # the server answered: "no registered model ..." / "cannot fetch it", not "unreachable"
    assert "unreachable" not in captured.err and "no-such-model" in captured.err, captured.err
    _stderr_checks(captured.err, captured.out, "models:/no-such-model/1", "http://me:***@127.0.0.1")
    assert not (tmp_path / "mlflow.db").exists()


PLAIN_LINE = "epoch 1/3  loss 0.41  lr=0.001  token: counts stay"  # ordinary output, unchanged


def test_what_a_command_prints_is_redacted_on_the_terminal_and_in_the_log(tmp_path, capfd):
    """Summaries print store paths ("dataset: s3://KEY:SECRET@bucket/..."): Python's streams in
    a console session redact them, on the terminal and in the full log alike."""
    from regft import console

    remember_secrets(["--note", "printed-token=tok-printed-77"])
    log = tmp_path / "run.log"
    with console.session(log, announce=False):
        print(f"dataset: s3://{S3_KEY}:{SECRET}@{BUCKET}/datasets/cars-1a2b")
        print("a library said: tok-printed-77")
        print(PLAIN_LINE)
    out = capfd.readouterr().out
    for text in (out, log.read_text()):
        assert SECRET not in text and "tok-printed-77" not in text, text
        assert f"@{BUCKET}/datasets/cars-1a2b" in text and PLAIN_LINE in text
