"""compressed-tensors jobs get the service's calibration sample count when they read calibration data, and none
when they do not (the rules refuse nsamples without a dataset)."""

from qaas.worker import attempt


def test_calibration_samples_reach_calibrated_compressed_tensors_jobs(settings):
    out = settings.work_dir / "out"
    fp8 = {"quant_method": "compressed-tensors", "scheme": "FP8", "dataset": "wikitext2"}
    spec = attempt.build_spec(settings, {"model": {"path": "/m"}, "quantization_config": fp8,
                                         "options": {"calibration_samples": 32}}, out)
    assert spec["quantization_config"] == {**fp8, "nsamples": 32}
    dynamic = {"quant_method": "compressed-tensors", "scheme": "FP8_DYNAMIC", "dataset": None}
    spec = attempt.build_spec(settings, {"model": {"path": "/m"}, "quantization_config": dynamic,
                                         "options": {"calibration_samples": 32}}, out)
    assert "nsamples" not in spec["quantization_config"]
