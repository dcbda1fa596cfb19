"""MLflow bookkeeping without Ray: where the tracking store is (and whether it answers), the
tags that tie a search's runs together, parameters and metrics in MLflow's terms, and finding or
closing runs. regft.tracking (the Ray Tune callback) and regft.registry (which serves models to
regft.predict, where Ray must not be imported) build on it. Functions take an `MlflowClient`;
this module imports neither MLflow nor Ray.
"""
from __future__ import annotations

import base64
import contextlib
import http.client
import importlib.util
import json
import math
import os
import re
import socket
import sqlite3
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from regft.cli import redact, shorten
from regft.phases import is_stamp_key
from regft.reports import BOOKKEEPING_KEYS

HEALTH_TIMEOUT_S = 5.0  # a tracking server that does not answer /health by then is down
PROBE_BYTES = 65536  # of a probe answer read: enough for one experiment as JSON
PARAM_CHARS = 6000  # MLflow's limit on a parameter value
TRIAL_TAG = "regft.trial_id"
SEARCH_TAG = "regft.search"
PARENT_TAG = "mlflow.parentRunId"


def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """The embedded default: a sqlite file in the working directory (`mlflow ui` opens it)."""
    path = Path(cwd or os.getcwd()).resolve() / "mlflow.db"
    return f"sqlite:///{path}"


def resolve_tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


TRACKING_URI_CHARS = 120  # of the URI quoted in a problem (a long sqlite path stays readable)
# SQLAlchemy dialects MLflow stores runs in: default port and driver module (what "+driver" names)
DATABASES = {"postgresql": (5432, "psycopg2"), "mysql": (3306, "MySQLdb"), "mssql": (1433, "pyodbc")}
DRIVERS = {  # the `+driver` of a database URI -> (module to import, pip package)
    "psycopg2": ("psycopg2", "psycopg2-binary"), "psycopg": ("psycopg", "psycopg[binary]"),
    "pg8000": ("pg8000", "pg8000"), "MySQLdb": ("MySQLdb", "mysqlclient"),
    "mysqldb": ("MySQLdb", "mysqlclient"), "pymysql": ("pymysql", "PyMySQL"),
    "mysqlconnector": ("mysql.connector", "mysql-connector-python"), "pyodbc": ("pyodbc", "pyodbc"),
    "pymssql": ("pymssql", "pymssql")}
MLFLOW_TABLES = {"experiments", "runs", "alembic_version"}  # present in every MLflow database
# schemes MLflow resolves through its own configuration (a Databricks profile): not probed here
DELEGATED_SCHEMES = ("databricks", "databricks-uc", "uc")
# a read-only MLflow REST call every tracking server answers with JSON (not only /health)
MLFLOW_API_PROBE = "/api/2.0/mlflow/experiments/search?max_results=1"
USE_INSTEAD = "use sqlite:////ABS/PATH/mlflow.db, http(s)://SERVER or postgresql://HOST/DB"


def check_tracking_uri(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> list[str]:
    """Problems with the tracking store (empty list: usable), checked for what it is: an MLflow
    server (http/https, it must answer MLflow's REST API), an SQLite file (a new or MLflow's own
    database), a database server (its driver installed, its port answering). Cheap: nothing is
    created, no run is opened; the credentials never appear in a problem."""
    where = f"--tracking-uri {shorten(uri, TRACKING_URI_CHARS)}"
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    scheme = m.group(1).lower() if m and "://" in uri else ""
    base, _, driver = scheme.partition("+")
    if base in ("http", "https"):
        return _check_server(uri, where, timeout)
    if base == "sqlite":
        return _check_sqlite(uri, where)
    if base in DATABASES:
        return _check_database(uri, base, driver, where, timeout)
    if base in DELEGATED_SCHEMES:
        return []
    if base in ("", "file"):
        path = uri.removeprefix("file://")
        fix = (f"sqlite:///{Path(path).expanduser().resolve()}" if path.endswith(".db")
               else default_tracking_uri() + " (sqlite)")
        return [f"{where}: MLflow refuses plain-folder stores; use {fix} or an http(s) tracking server"]
    return [f"{where}: unknown scheme {shorten(scheme)}; {USE_INSTEAD}"]


def _check_sqlite(uri: str, where: str) -> list[str]:
    path = uri[len("sqlite:///"):].partition("?")[0] if uri.startswith("sqlite:///") else ""
    db = Path(path)
    if not path or not db.is_absolute():
        return [f"{where}: use an absolute sqlite path, sqlite:////abs/path/mlflow.db"]
    if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
        return [f"{where}: folder {shorten(str(db.parent))} does not exist or is not writable"]
    if not db.exists():
        return []  # MLflow creates it
    if db.is_dir():
        return [f"{where}: {shorten(str(db))} is a folder; name a database file inside it"]
    if not os.access(db, os.R_OK | os.W_OK):
        return [f"{where}: {shorten(str(db))} is not readable and writable"]
    if db.stat().st_size == 0:
        return []  # an empty file is an empty database: MLflow fills it
    try:  # read-only: the check never writes to (or creates) the user's file
        with contextlib.closing(sqlite3.connect(f"file:{urllib.parse.quote(str(db))}?mode=ro",
                                                uri=True, timeout=1.0)) as con:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as e:
        return [f"{where}: {shorten(str(db))} is not an SQLite database ({e}); point --tracking-uri at "
                "MLflow's database or a new file"]
    if tables and not MLFLOW_TABLES <= tables:
        return [f"{where}: {shorten(str(db))} is an SQLite database of something else (tables "
                f"{shorten(sorted(tables))}), not MLflow's; point --tracking-uri at a new file"]
    return []


def _check_database(uri: str, base: str, driver: str, where: str, timeout: float) -> list[str]:
    problems = []
    module, package = DRIVERS.get(driver or DATABASES[base][1], (None, None))
    if module is not None:
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # a dotted module whose parent is missing
            found = False
        if not found:
            problems.append(f"{where}: the database driver {module} is not installed (pip install {package})")
    try:
        host, port = _host_port(uri, DATABASES[base][0])
    except ValueError as e:
        return [*problems, f"{where}: {e}"]
    if host and not host.startswith("/"):  # a unix socket path is not probed
        try:
            socket.create_connection((host, port), timeout=timeout).close()
        except OSError as e:
            problems.append(f"{where}: database server {host}:{port} unreachable ({e.strerror or e}); "
                            "start it or fix the host and port")
    return problems


def _host_port(uri: str, default_port: int) -> tuple[str, int]:
    """(host, port) of a URI's authority, without its userinfo (a password may hold '@' and ':',
    which MLflow's client reads as well; a raw '/' ends the authority for it: refused)."""
    rest = uri.split("://", 1)[1].split("#", 1)[0].split("?", 1)[0]
    authority = rest.split("/", 1)[0]
    if "@" in rest[len(authority):]:
        raise ValueError("its user:password part holds a '/', which ends the host for MLflow: "
                         "percent-encode it as %2F (and '@' as %40)")
    hostport = authority.rpartition("@")[2]
    parsed = urllib.parse.urlsplit(f"//{hostport}")
    try:
        port = parsed.port
    except ValueError as e:
        raise ValueError(f"bad port in {shorten(hostport)} ({e})") from None
    return parsed.hostname or "localhost", port or default_port


def _check_server(uri: str, where: str, timeout: float) -> list[str]:
    """An MLflow tracking server: /health answers 200 and MLflow's REST API answers JSON. The
    probe goes to the parsed host (never the userinfo) and sends the URI's user:password, or
    MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN, as MLflow's client does."""
    parsed = urllib.parse.urlsplit(uri)
    try:
        host, port = _host_port(uri, 443 if parsed.scheme.lower() == "https" else 80)
    except ValueError as e:
        return [f"{where}: {e}"]
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    base = f"{parsed.scheme.lower()}://{netloc}{parsed.path.rstrip('/')}"
    headers = _auth_headers(parsed)
    fix_auth = ("pass user:password@ in the URI (percent-encode '@' and '/'), or set "
                "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
    for path in ("/health", MLFLOW_API_PROBE):
        status, body, reason = _http_get(base + path, headers, timeout)
        if status is None:
            return [f"{where}: tracking server unreachable ({reason}); start it "
                    "(scripts/mlflow_server.sh) or drop --tracking-uri to use the local store"]
        if status in (401, 403):
            return [f"{where}: the server refused the credentials (HTTP {status}); {fix_auth}"]
        if path == "/health" and status != 200:
            return [f"{where}: server answered {status} on /health: not an MLflow tracking server "
                    "(or not at this address); check the address, port and path"]
        if path == MLFLOW_API_PROBE and not _is_mlflow_json(status, body):
            return [f"{where}: the server at {shorten(netloc)} answers, but is not an MLflow "
                    f"tracking server (HTTP {status} from MLflow's REST API path, not MLflow's JSON); "
                    "check the address and port"]
    return []


def _auth_headers(parsed: urllib.parse.SplitResult) -> dict[str, str]:
    user = urllib.parse.unquote(parsed.username or "") or os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    password = (urllib.parse.unquote(parsed.password or "") if parsed.username
                else os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    if user or password:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    return {}


def _http_get(url: str, headers: dict[str, str], timeout: float) -> tuple[int | None, bytes, str]:
    """(status, first bytes of the body, reason); status None when nothing answered."""
    context = None
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        context = ssl._create_unverified_context()  # noqa: S323 (the user asked for it, as MLflow does)
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as resp:  # noqa: S310
            return resp.status, resp.read(PROBE_BYTES), ""
    except urllib.error.HTTPError as e:
        return e.code, e.read(PROBE_BYTES) if e.fp else b"", str(e.reason)
    except (OSError, ValueError, http.client.HTTPException) as e:
        return None, b"", redact(str(getattr(e, "reason", e)))


def _is_mlflow_json(status: int, body: bytes) -> bool:
    """MLflow answers its REST API with a JSON object: the result, or {"error_code": ...}."""
    if len(body) >= PROBE_BYTES:  # cut short: a JSON object's start is all there is to see
        return body.lstrip().startswith(b'{\n  "experiments"') or b'"experiment_id"' in body
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    if not isinstance(data, dict):
        return False
    # a result lists experiments ({} when there are none: empty fields are left out); an error
    # is MLflow's {"error_code": ..., "message": ...}
    return "error_code" in data if status != 200 else (data == {} or "experiments" in data)


def flat_params(params: dict[str, Any]) -> dict[str, str]:
    """MLflow params are strings of at most PARAM_CHARS; redact and stringify."""
    out = {}
    for k, v in redact(params).items():
        s = str(v)
        out[str(k)] = s if len(s) <= PARAM_CHARS else s[:PARAM_CHARS - 3] + "..."
    return out


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a report (or a Tune result, less Tune's and Train's bookkeeping and
    the phases' wall-clock stamps, regft.phases)."""
    out = {}
    for k, v in result.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or k in BOOKKEEPING_KEYS:
            continue
        if is_stamp_key(k):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out[k] = float(v)
    return out


def get_or_create_experiment(client, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def find_run(client, experiment_id: str, tags: dict[str, str]):
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=flt, max_results=2)
    return runs[0] if runs else None


def close_orphan_runs(client, experiment_id: str, parent_id: str, trial_ids) -> list[str]:
    """End the child runs of `parent_id` still RUNNING whose trial is not in `trial_ids` (the
    trials the finished search knows). A driver killed right after a trial started can lose that
    trial from Tune's saved state: `--resume` never restarts it (it samples a new one), so its
    run would stay RUNNING forever. It is marked KILLED with `regft.outcome=orphaned`, not
    deleted (whatever it logged stays). Returns their trial ids."""
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'"))
    keep = {str(t) for t in trial_ids}
    orphans = [r for r in runs if r.data.tags.get(TRIAL_TAG) not in keep]
    for r in orphans:
        client.set_tag(r.info.run_id, "regft.outcome", "orphaned")
        client.set_terminated(r.info.run_id, status="KILLED")
    return [r.data.tags.get(TRIAL_TAG) for r in orphans]
