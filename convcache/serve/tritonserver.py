"""How to start the `tritonserver` that PyPI's `nvidia-pytriton` wheel ships on a repository written by
`convcache triton --backend python`, without PyTriton's Python API (which serves Python callables, not a
repository).

That wheel holds the binary (`pytriton/tritonserver/bin/tritonserver`), its python backend, one
python-backend stub per Python version (`python_backend_stubs/3.X/triton_python_backend_stub`) and the
shared libraries they link (`nvidia_pytriton.libs`). Starting it needs what PyTriton does for it:
- a backend folder whose `python/` holds the backend and the stub built for the interpreter that runs
  model.py (copied: Triton looks for the stub beside the backend);
- that interpreter's `bin/` first on PATH: the stub embeds the system's libpython3.X and finds its prefix,
  and so its standard library and site-packages, from the `python3` on PATH. That interpreter must be the
  one whose libpython the stub loads (a pyenv 3.11.7 over Debian's 3.11.2 runtime breaks multiprocessing),
  and its environment needs numpy<2 (the stub's tensor interop reads numpy 2 arrays as empty) and
  onnxruntime;
- the wheel's libraries on LD_LIBRARY_PATH.

`make tritonserver` installs nvidia-pytriton, numpy<2 and onnxruntime into .tools/tritonserver/env: the
package's folder is the distribution, the venv's python the stub's interpreter."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from convcache.errors import ConvcacheError


@dataclass
class Distribution:
    """An installed or unpacked nvidia-pytriton wheel (`root`, the folder holding `pytriton/` and
    `nvidia_pytriton.libs/`: a site-packages) and the interpreter the python-backend stub runs model.py with
    (its environment's `bin/python`)."""

    root: Path
    python: Path
    _version: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def server(self) -> Path:
        return self.root / "pytriton" / "tritonserver" / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.root / "nvidia_pytriton.libs"

    def python_version(self) -> str:
        """The stub's interpreter's X.Y (asked once: every stub lookup needs it)."""
        if self._version is None:
            out = subprocess.run([str(self.python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise ConvcacheError(f"{self.python}: does not run ({out.stderr.strip()[-200:]})")
            self._version = out.stdout.strip()
        return self._version

    def stub(self) -> Path:
        return self.root / "pytriton" / "tritonserver" / "python_backend_stubs" / self.python_version() / \
            "triton_python_backend_stub"

    def problem(self) -> str | None:
        """Why this distribution cannot serve here (a missing file, a library the loader cannot find, an
        interpreter without numpy<2 and onnxruntime), or None."""
        for path in (self.server, self.python):
            if not path.exists():
                return f"{path} is missing (make tritonserver)"
        try:
            stub = self.stub()
        except ConvcacheError as error:
            return str(error)
        if not stub.exists():
            return f"no python-backend stub for Python {self.python_version()} in {stub.parent.parent}"
        env = self.environment()
        linked = {}
        for binary in (self.server, stub):
            out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=env, timeout=60)
            missing = [line.strip() for line in out.stdout.splitlines() if "not found" in line]
            if out.returncode != 0 or missing:
                return f"{binary.name} cannot load here: {'; '.join(missing) or out.stderr.strip()}"
            linked[binary] = out.stdout
        runtime = _libpython(linked[stub])
        own = ("import os, sysconfig as s; v = s.get_config_var; print('\\n'.join(os.path.realpath(os.path.join("
               "v('LIBDIR'), *d, v('INSTSONAME') or '')) for d in ((), (v('MULTIARCH') or '',))))")
        out = subprocess.run([str(self.python), "-c", own], capture_output=True, text=True, timeout=60)
        if runtime and runtime not in out.stdout.split():
            return (f"the stub loads {runtime}, which is not {self.python}'s own libpython: build the stub's venv "
                    f"from the system python3 (make tritonserver does), or its standard library and runtime differ")
        check = ("import numpy, onnxruntime, sys; "
                 "sys.exit(0 if int(numpy.__version__.split('.')[0]) < 2 else 'numpy %s: the stub needs numpy<2' "
                 "% numpy.__version__)")
        out = subprocess.run([str(self.python), "-c", check], capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            return f"{self.python}: {(out.stderr.strip().splitlines() or ['no numpy<2 or onnxruntime'])[-1]}"
        return None

    def environment(self) -> dict:
        env = dict(os.environ)
        env["PATH"] = f"{self.python.parent}{os.pathsep}{env.get('PATH', '')}"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(self.libs), env.get("LD_LIBRARY_PATH")) if p)
        return env

    def backends(self, folder: Path) -> Path:
        """A backend folder for `--backend-directory`: the python backend with the stub for `python`."""
        source = self.root / "pytriton" / "tritonserver" / "backends" / "python"
        target = Path(folder) / "python"
        target.mkdir(parents=True, exist_ok=True)
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, target / item.name)
        shutil.copy2(self.stub(), target / "triton_python_backend_stub")
        return Path(folder)

    def command(self, repository: str | os.PathLike, workdir: str | os.PathLike, http_port: int, grpc_port: int,
                metrics_port: int) -> tuple[list[str], dict]:
        """The argv and environment that serve `repository` (HTTP, gRPC and metrics on these ports)."""
        backends = self.backends(Path(workdir) / "backends")
        argv = [str(self.server), f"--model-repository={repository}", f"--backend-directory={backends}",
                f"--http-port={http_port}", f"--grpc-port={grpc_port}", f"--metrics-port={metrics_port}",
                "--allow-gpu-metrics=false", "--log-verbose=0"]
        return argv, self.environment()


def _libpython(ldd_output: str) -> str | None:
    """The libpython a binary loads, resolved, from `ldd`'s answer."""
    for line in ldd_output.splitlines():
        name, _, rest = line.strip().partition(" => ")
        if name.startswith("libpython") and rest:
            return os.path.realpath(rest.split(" (")[0])
    return None


def default_distribution(project: str | os.PathLike = ".") -> Distribution:
    """`make tritonserver`'s venv under `project`, or CONVCACHE_TRITONSERVER (a folder holding `pytriton/`)
    and CONVCACHE_TRITON_PYTHON (the stub's interpreter) where set."""
    env = Path(project) / ".tools" / "tritonserver" / "env"
    found = sorted(env.glob("lib/python3*/site-packages"))
    root = os.environ.get("CONVCACHE_TRITONSERVER") or (found[0] if found else env / "lib" / "site-packages")
    return Distribution(Path(root), Path(os.environ.get("CONVCACHE_TRITON_PYTHON", env / "bin" / "python")))
