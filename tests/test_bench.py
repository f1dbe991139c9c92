"""The DAG benchmark builds the whole per-subject DAG (it broke once when rules gained an input)."""

import nibabel as nib
import numpy as np
import pytest

from vcm.bench import bench_dag


@pytest.mark.workflow
def test_bench_dag_lists_three_jobs_per_subject(tmp_path):
    t1 = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(t1))
    result = bench_dag(20, t1, cohort_size=100)
    assert result["per_subject_jobs"] == 60
    assert result["shard_jobs"] == 7 and result["profile"] == "profiles/slurm"  # ceil(100 / 16) shards
    assert result["seconds"] > 0 and result["cpu_seconds"] > 0
