"""The README's configuration examples load with the real config loader."""

from __future__ import annotations

import re
from pathlib import Path

from hostmesh import load_agent_config, load_service_file

README = Path(__file__).resolve().parents[1] / "README.md"


def toml_blocks() -> list[str]:
    return re.findall(r"```toml\n(.*?)```", README.read_text(), re.S)


def test_readme_agent_and_service_examples_load(tmp_path: Path) -> None:
    blocks = toml_blocks()
    agent_blocks = [b for b in blocks if "[api]" in b]
    service_blocks = [b for b in blocks if b.lstrip().startswith("name =")]
    assert len(agent_blocks) == 1 and len(service_blocks) == 1
    (tmp_path / "agent.toml").write_text(agent_blocks[0])
    cfg = load_agent_config(tmp_path / "agent.toml")
    assert cfg.az == "eu-west-1a" and cfg.dns.service_ttl == {"web": 5.0, "*": 1.0}
    assert cfg.upstream[0].service == "postgres" and cfg.proxy.bind == "127.0.0.1:4140"
    assert [r.name for r in cfg.traffic["udvr"].routes] == ["canary", "default"]
    (tmp_path / "udvr.toml").write_text(service_blocks[0])
    (svc,) = load_service_file(tmp_path / "udvr.toml")
    assert svc.name == "udvr" and svc.checks[0].failures_before_critical == 3
