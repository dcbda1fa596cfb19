"""Issue 6: the cluster path, offline.

- `cluster/aws.yaml` passes Ray's own config schema and Ray's AWS bootstrap (against moto), with
  no port open to the world and versions pinned to the project's;
- `ray job submit --working-dir .` of a search to a `ray start` head (auth off, 127.0.0.1, its
  own temp dir, stopped by PID) succeeds and logs its MLflow runs; given no --tracking-uri, its
  MLflow store and its export land in ~/.regft on the head, not in Ray's temporary copy of the
  working dir (issue 19 item 14);
- that search's `--storage s3://...` (moto's S3 server) holds the generated shards, the Ray
  Train checkpoints, the Tune results and the MLflow artifacts.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
AWS_YAML = ROOT / "cluster" / "aws.yaml"
BUCKET = "regft-test"
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")


# ------------------------------------------------------------------ processes by PID ----

def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line), from /proc (no psutil in the project)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        out[int(d.name)] = (ppid, cmd)
    return out


def _tree(root_pids: set[int], marker: str) -> set[int]:
    """The given processes, every process whose command line names `marker` (our temp dir),
    and all their descendants."""
    table = _proc_table()
    found = {p for p in root_pids if p in table} | {p for p, (_, cmd) in table.items() if marker in cmd}
    found.discard(os.getpid())
    grew = True
    while grew:
        more = {p for p, (pp, _) in table.items() if pp in found and p != os.getpid()}
        grew = not more <= found
        found |= more
    return found


def _stop(proc: subprocess.Popen, marker: str, grace: float = 8.0) -> None:
    """Stop a process we started and everything it (or our Ray temp dir) spawned, by PID."""
    victims = _tree({proc.pid}, marker)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` shuts its node down on SIGTERM
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    victims |= _tree({proc.pid}, marker)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.wait(timeout=10)


# --------------------------------------------------------------------- the config ----

def _load_setup_script():
    spec = importlib.util.spec_from_file_location("aws_setup", ROOT / "cluster" / "aws_setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_aws_yaml_passes_ray_schema_and_bootstrap_with_no_open_ports(tmp_path, monkeypatch):
    from ray.autoscaler._private.util import prepare_config, validate_config

    monkeypatch.setenv("HOME", str(tmp_path))  # the bootstrap writes its SSH key under ~/.ssh
    for k, v in {**FAKE_AWS, "AWS_DEFAULT_REGION": "us-west-2",
                 "MOTO_IAM_LOAD_MANAGED_POLICIES": "true"}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    raw = yaml.safe_load(AWS_YAML.read_text())
    config = prepare_config(raw)  # merges Ray's AWS defaults; then Ray's own JSON schema
    validate_config(config)

    # node types: a CPU head, a 1-GPU type and a multi-GPU type, with autoscaling bounds
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["node_config"]["InstanceType"]
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert head.startswith(("m", "c", "r")), head
    assert {v["node_config"]["InstanceType"].split(".")[0][:2] for v in workers.values()} <= {"g5", "g6"}
    assert any(v["node_config"]["InstanceType"].endswith(".12xlarge") for v in workers.values())
    assert all(0 <= v["min_workers"] <= v["max_workers"] for v in workers.values())
    assert config["max_workers"] >= max(v["max_workers"] for v in workers.values())
    # every node reaches S3 through an instance profile, never through keys in the file
    assert all("IamInstanceProfile" in v["node_config"] for v in types.values())
    assert not re.search(r"AKIA|aws_secret_access_key|AWS_SECRET", AWS_YAML.read_text())
    # the dashboard binds 127.0.0.1 (reached through SSH forwarding)
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])

    # Ray's AWS bootstrap against a fake AWS, after the documented one-time set-up
    from moto import mock_aws
    from ray.autoscaler._private.aws import config as aws_config

    monkeypatch.setattr(aws_config.time, "sleep", lambda s: None)  # IAM propagation waits
    setup = _load_setup_script()
    assert setup.main(["--bucket", BUCKET, "--region", "us-west-2", "--ssh-cidr", "0.0.0.0/0"]) == 2
    with mock_aws():
        import boto3

        assert setup.main(["--bucket", BUCKET, "--region", "us-west-2",
                           "--ssh-cidr", "203.0.113.7/32"]) == 0
        booted = aws_config.bootstrap_aws(config)
        ec2 = boto3.client("ec2", region_name="us-west-2")
        sg_ids = {g for v in booted["available_node_types"].values()
                  for g in v["node_config"]["SecurityGroupIds"]}
        groups = ec2.describe_security_groups(GroupIds=sorted(sg_ids))["SecurityGroups"]
        iam = boto3.client("iam")
        for name in ("regft-ray-head", "regft-ray-worker"):
            assert iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Roles"]
        head_policies = [p["PolicyArn"] for p in
                         iam.list_attached_role_policies(RoleName="regft-ray-head")["AttachedPolicies"]]
        worker_policies = iam.list_attached_role_policies(RoleName="regft-ray-worker")["AttachedPolicies"]
    assert [g["GroupName"] for g in groups] == ["regft-ray"]  # Ray created no group of its own
    for rule in groups[0]["IpPermissions"]:
        cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])] + \
                [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
        assert "0.0.0.0/0" not in cidrs and "::/0" not in cidrs, rule
        if cidrs:
            assert (rule["FromPort"], rule["ToPort"]) == (22, 22), rule  # only SSH from outside
    assert head_policies == ["arn:aws:iam::aws:policy/AmazonEC2FullAccess"]
    assert worker_policies == []  # workers: the bucket only (inline policy), no EC2

    # versions: the image pins the project's Ray and Python, never `latest`
    image = config["docker"]["image"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", image)
    assert m, f"{image}: expected rayproject/ray:<ray version>-py<python>-gpu"
    import ray

    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; the project is 3.10+)
    ray_floor = re.search(r'"ray\[[^\]]*\]>=\s*([\d.]+)"', pyproject).group(1)
    requires_python = re.search(r'requires-python\s*=\s*"([^"]+)"', pyproject).group(1)
    assert m.group(1) == ray.__version__ == ray_floor, (image, ray.__version__, ray_floor)
    py = (int(m.group(2)), int(m.group(3)))
    py_floor = tuple(int(x) for x in re.search(r">=\s*(\d+)\.(\d+)", requires_python).groups())
    assert py >= py_floor, (image, requires_python)
    assert py == sys.version_info[:2], f"{image} runs Python {py}, the tests run {sys.version_info[:2]}"
    # the set-up installs this project with the torch builds the README and CI pin
    setup_cmds = " ".join(config["setup_commands"])
    pins = set(re.findall(r"torch(?:vision)?==[\d.]+", (ROOT / "scripts" / "test.sh").read_text()))
    assert pins and all(p in setup_cmds for p in pins), (pins, setup_cmds)
    assert "regft[cluster]" in setup_cmds and config["file_mounts"].get("~/regft") == "."
    # the Kubernetes variant: same base image (cluster/Dockerfile), same pins, same Ray
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f"FROM {image}" in dockerfile and all(p in dockerfile for p in pins)
    rayjob = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())
    assert rayjob["kind"] == "RayJob" and rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert rayjob["spec"]["entrypoint"].startswith("python -m regft.tune ")


def test_job_upload_carries_code_and_search_spaces_not_venv_or_git(tmp_path):
    """`ray job submit --working-dir .` zips the checkout; .rayignore keeps it small even when
    Ray is told to ignore .gitignore (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1)."""
    from ray._private.runtime_env.packaging import _zip_files

    out = tmp_path / "pkg.zip"
    _zip_files(str(ROOT), [], str(out), include_gitignore=False)
    names = zipfile.ZipFile(out).namelist()
    assert "regft/tune.py" in names and "regft/search_spaces/default.yaml" in names
    assert any(n.startswith("regft/pretrained/") for n in names)  # the shapes testbed's CLIP
    assert not [n for n in names if n.startswith((".venv", ".git/", ".venv-ci"))]
    assert out.stat().st_size < 40 * 2**20, out.stat().st_size


# ------------------------------------------------------- a job on a `ray start` head ----

@pytest.fixture(scope="module")
def moto_s3():
    """moto's S3 server on 127.0.0.1 with one bucket; yields the env that points clients at it."""
    port = _free_port()
    marker = tempfile.mkdtemp(prefix="regft-moto-")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            cwd=marker, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"http://127.0.0.1:{port}/moto-api/", 60, proc)
        env = {**FAKE_AWS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        import boto3

        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                     aws_access_key_id="testing", aws_secret_access_key="testing",
                     aws_session_token="testing").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        _stop(proc, marker)
        shutil.rmtree(marker, ignore_errors=True)


@pytest.fixture(scope="module")
def submitted_search(moto_s3, tmp_path_factory):
    """`ray start --head` (auth off, 127.0.0.1, own temp dir), then `ray job submit
    --working-dir .` of a 1-trial shapes search with --storage s3://; waits for the job."""
    import ray

    ray.shutdown()  # the shared in-process Ray (as no_local_ray does): CPUs are tight
    work = tmp_path_factory.mktemp("cluster-job")
    temp_dir = tempfile.mkdtemp(prefix="rjob", dir="/tmp")  # short: Ray's sockets live under it
    gcs, dash = _free_port(), _free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, **moto_s3,
           "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),  # `python` = this venv's
           "HOME": str(work / "home"),  # the driver keeps its Optuna study under ~/.regft
           # one Ray per machine on a real cluster; here other Rays may run next to this one:
           # pin every process of this cluster to it (what regft.raylocal does for local Rays)
           "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
    (work / "home").mkdir()
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "MLFLOW_TRACKING_URI", "REGFT_STORE", "REGFT_HOME"):
        env.pop(k, None)
    ports = {"--port": gcs, "--dashboard-port": dash, "--ray-client-server-port": _free_port(),
             "--dashboard-agent-listen-port": _free_port(), "--dashboard-agent-grpc-port": _free_port(),
             "--metrics-export-port": _free_port(), "--runtime-env-agent-port": _free_port()}
    head = subprocess.Popen(
        [str(Path(bin_dir) / "ray"), "start", "--head", "--block", "--num-cpus", "2",
         "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--include-dashboard",
         "true", "--temp-dir", temp_dir, *[f"{k}={v}" for k, v in ports.items()]],
        env=env, cwd=work, stdout=open(work / "head.log", "w"), stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dash}"
    home = work / "home" / ".regft"  # a job's default outputs (regft.raylocal.durable_home)
    tracking = f"sqlite:///{home / 'mlflow.db'}"  # the default: the job is given none
    storage = f"s3://{BUCKET}/runs"
    t0 = time.time()
    try:
        _wait_http(f"{address}/api/version", 120, head)
        t_head = time.time() - t0
        cmd = [str(Path(bin_dir) / "ray"), "job", "submit", "--address", address, "--no-wait",
               "--submission-id", "regft-job-e2e", "--working-dir", str(ROOT), "--",
               "python", "-m", "regft.tune", "shapes", "--preset", "smoke", "--num-samples", "1",
               "--epochs", "1", "--images-per-class", "16", "--batch-size", "32",
               "--warmup-steps", "2", "--name", "job-e2e", "--storage", storage]
        sub = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(address)
        status = client.get_job_status("regft-job-e2e")
        while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert time.time() - t0 < 480, f"job still {status} after {time.time() - t0:.0f} s"
            time.sleep(2)
            status = client.get_job_status("regft-job-e2e")
        logs = client.get_job_logs("regft-job-e2e")
        yield {"status": status, "logs": logs, "tracking_uri": tracking, "storage": storage,
               "home": home, "ray_temp": temp_dir,
               "env": moto_s3, "head_s": t_head, "total_s": time.time() - t0, "submit": sub.stdout}
    finally:
        _stop(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_submit_runs_the_search_and_logs_mlflow_runs(submitted_search):
    from ray.job_submission import JobStatus

    r = submitted_search
    print(f"head up in {r['head_s']:.0f} s; job done after {r['total_s']:.0f} s")
    assert r["status"] == JobStatus.SUCCEEDED, r["logs"][-4000:]
    assert "Search job-e2e: best trial" in r["logs"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(r["tracking_uri"])
    exp = client.get_experiment_by_name("regft-shapes")
    runs = client.search_runs([exp.experiment_id])
    parents = [x for x in runs if x.data.tags.get("regft.role") == "search"]
    children = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 1 and "select_metric" in children[0].data.metrics
    # artifacts live under the storage URI, next to the datasets and checkpoints
    assert exp.artifact_location == f"{r['storage']}/mlflow-artifacts/regft-shapes"
    # what the job leaves on the head outlives it: nothing in Ray's copy of the working dir
    # (which Ray deletes with its session), the store and the export in the durable home
    assert f"under {r['home']} ($REGFT_HOME)" in r["logs"], r["logs"][-4000:]
    summary = r["logs"].split("Search job-e2e: best trial")[1].splitlines()
    where = [line for line in summary if line.lstrip().startswith(("MLflow:", "model:"))]
    assert where and all(str(r["home"]) in w and "_ray_pkg_" not in w for w in where), where
    assert (r["home"] / "exports" / "job-e2e").is_dir()
    assert not str(r["home"]).startswith(r["ray_temp"])


def test_s3_storage_holds_shards_checkpoints_results_and_artifacts(submitted_search):
    import pyarrow.fs as pafs

    r = submitted_search
    assert "SUCCEEDED" in str(r["status"]), r["logs"][-4000:]
    fs = pafs.S3FileSystem(endpoint_override=r["env"]["AWS_ENDPOINT_URL"], access_key="testing",
                           secret_key="testing", session_token="testing", region="us-east-1")
    files = [i.path[len(f"{BUCKET}/runs/"):] for i in
             fs.get_file_info(pafs.FileSelector(f"{BUCKET}/runs", recursive=True))
             if i.type == pafs.FileType.File]
    assert [f for f in files if re.fullmatch(r"datasets/shapes-\w+/shards/shard-\d+\.parquet", f)]
    manifests = [f for f in files if re.fullmatch(r"datasets/shapes-\w+/manifest\.json", f)]
    with fs.open_input_stream(f"{BUCKET}/runs/{manifests[0]}") as f:
        assert json.loads(f.read())["complete"] is True
    assert [f for f in files if re.fullmatch(r"train/job-e2e-\w+/checkpoint_[^/]+/model\.pt", f)]
    assert [f for f in files if re.fullmatch(r"searches/job-e2e/trial_fn_[^/]+/result\.json", f)]
    assert [f for f in files if f.startswith("searches/job-e2e/experiment_state")]
    artifacts = {f.rsplit("/", 1)[-1] for f in files if f.startswith("mlflow-artifacts/regft-shapes/")}
    assert {"results.csv", "summary.txt", "samples.png", "alpha_curve.png"} <= artifacts, artifacts


def test_local_storage_is_refused_on_a_multi_node_cluster(monkeypatch):
    """Each node would write shards and checkpoints to its own disk; a URI is shared."""
    import ray

    from regft.resources import check_shared_storage

    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    (problem,) = check_shared_storage("regft_runs")
    assert "--storage regft_runs" in problem and "2 nodes" in problem and "s3://" in problem
    assert check_shared_storage(f"s3://{BUCKET}/regft") == []
    assert check_shared_storage("file:///mnt/shared/regft") == []
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    assert check_shared_storage("regft_runs") == []
