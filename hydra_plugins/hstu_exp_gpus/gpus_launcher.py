"""hydra/launcher=gpus: Hydra's joblib launcher with one worker per GPU (hstu_exp.gpu_launch).

Hydra imports every module of hydra_plugins at start-up, so this one imports only Hydra's."""

from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher


class GpuLauncher(JoblibLauncher):
    def __init__(self, gpus="all", **joblib) -> None:
        super().__init__(**joblib)
        self.gpus = gpus

    def launch(self, job_overrides, initial_job_idx):
        from hstu_exp.gpu_launch import launch

        return launch(self, job_overrides, initial_job_idx)
