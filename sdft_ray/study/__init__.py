"""The science study (docs/study.md): does SDFT learn new facts while forgetting less than SFT?

* :mod:`~sdft_ray.study.spec` - the study file (``configs/study/*.yaml``), typed and validated;
* :mod:`~sdft_ray.study.design` - which facts are trained and which are controls; teacher prompts;
* :mod:`~sdft_ray.study.verdict` - the pre-registered rules: Phase-0 gate, template choice,
  best phase-1 setting, the verdict;
* :mod:`~sdft_ray.study.run` - phases 0-2, resumable, with progress;
* :mod:`~sdft_ray.study.report` - raw rows, paired tests, ``summary.md``, the two plots;
* :mod:`~sdft_ray.study.combine` - one table, verdict and frontier over several output folders.

Forgetting is measured by :mod:`sdft_ray.evaluation.forgetting`, intervals and tests by
:mod:`sdft_ray.evaluation.stats`.
"""

from sdft_ray.study.spec import ArmSpec, StudySpec, load_study, study_from_dict

__all__ = ["ArmSpec", "StudySpec", "load_study", "run_study", "study_from_dict"]


def __getattr__(name: str):
    if name == "run_study":  # imports torch and Ray only when asked for
        from sdft_ray.study.run import run_study

        return run_study
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
