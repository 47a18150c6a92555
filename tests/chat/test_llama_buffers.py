"""llama.cpp's extra CPU buffer types (``chat.llama_buffers``): off on a CPU that reports AMX, where
every decode crashed; the same choice for the high-level ``Llama`` and the low-level loader."""

from __future__ import annotations

import pytest

from chat import llama_buffers


@pytest.mark.parametrize(
    ("setting", "amx", "expected"),
    [("auto", True, False), ("auto", False, True), ("on", True, True), ("off", False, False), (" OFF ", True, False)],
)
def test_the_setting_and_the_cpu_decide_whether_llama_cpp_may_use_extra_buffers(settings, monkeypatch, setting, amx,
                                                                                 expected):
    settings.LLM_CPU_EXTRA_BUFFERS = setting
    monkeypatch.setattr(llama_buffers, "_cpu_reports_amx", lambda: amx)
    assert llama_buffers.cpu_extra_buffers() is expected


def test_an_unknown_value_is_refused_with_the_allowed_ones(settings):
    settings.LLM_CPU_EXTRA_BUFFERS = "maybe"
    with pytest.raises(ValueError, match="must be on, off or auto, not 'maybe'"):
        llama_buffers.cpu_extra_buffers()


def test_while_a_model_loads_llama_cpps_default_parameters_carry_the_choice_and_are_restored_after(settings):
    import llama_cpp.llama_cpp as low_level

    untouched = low_level.llama_model_default_params
    assert untouched().use_extra_bufts is True  # llama.cpp's own default
    settings.LLM_CPU_EXTRA_BUFFERS = "off"
    with llama_buffers.llama_loading():
        assert low_level.llama_model_default_params().use_extra_bufts is False
        params = untouched()
        llama_buffers.model_params_apply(params)
        assert params.use_extra_bufts is False
    assert low_level.llama_model_default_params is untouched
    assert low_level.llama_model_default_params().use_extra_bufts is True


def test_the_restore_happens_when_loading_fails(settings):
    import llama_cpp.llama_cpp as low_level

    untouched = low_level.llama_model_default_params
    with pytest.raises(RuntimeError):
        with llama_buffers.llama_loading():
            raise RuntimeError("could not load")
    assert low_level.llama_model_default_params is untouched
