"""The layering the project promises: the science never imports Flower or MLflow; client and server never
import each other; only server/tracking.py talks to MLflow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def package_files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("path", package_files("strnet"), ids=lambda p: str(p.relative_to(REPO)))
def test_strnet_imports_neither_flower_nor_mlflow(path: Path) -> None:
    # strnet/cli.py is the composition root: it may import server.tracking lazily, inside the commands that track.
    names = imported_modules(path, top_level_only=path.name == "cli.py")
    bad = {n for n in names if n.split(".")[0] in {"flwr", "mlflow", "client", "server"}}
    assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


@pytest.mark.parametrize(
    ("package", "forbidden"), [("client", "server"), ("server", "client")], ids=["client", "server"]
)
def test_client_and_server_never_import_each_other(package: str, forbidden: str) -> None:
    for path in package_files(package):
        names = imported_modules(path, top_level_only=False)
        bad = {n for n in names if n.split(".")[0] == forbidden}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_only_tracking_imports_mlflow() -> None:
    """server/models.py (the bundle as an MLflow model, the registry) is tracking's one companion."""
    users = {
        str(p.relative_to(REPO))
        for pkg in ("strnet", "client", "server", "configs", "simulations")
        for p in package_files(pkg)
        if any(n.split(".")[0] == "mlflow" for n in imported_modules(p, top_level_only=False))
    }
    assert users == {"server/tracking.py", "server/models.py"}


def test_client_and_server_share_one_wire_protocol() -> None:
    """Record keys, message kinds and the version live in strnet/protocol.py only; both sides import them."""
    for path in [
        REPO / "client" / "app.py",
        *(REPO / "server" / n for n in ("strategy.py", "discovery.py", "frozen.py")),
    ]:
        assert "strnet.protocol" in imported_modules(path, top_level_only=True), path.name
    for pkg in ("client", "server", "strnet"):
        for path in package_files(pkg):
            if path.name == "protocol.py":
                continue
            tree = ast.parse(path.read_text())
            names = {
                t.id
                for node in tree.body
                if isinstance(node, ast.Assign)
                for t in node.targets
                if isinstance(t, ast.Name)
            }
            own = sorted(n for n in names if n.endswith("_KEY") or n.endswith("_TYPE") or n == "PROTOCOL_VERSION")
            assert not own, f"{path.relative_to(REPO)} defines wire names {own} outside strnet/protocol.py"


def test_a_site_does_not_load_the_centralized_run() -> None:
    """A hospital node runs the engine; it never imports the centralized orchestration or the run finish."""
    names = imported_modules(REPO / "strnet" / "site.py", top_level_only=False)
    assert not names & {"strnet.centralized", "strnet.run", "strnet.training", "strnet.evaluation"}
