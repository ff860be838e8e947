"""realnet/validation.py: the held-out validation's verdict on whether a run learnt anything."""
import json

from realnet import validation


def write_log(folder, entries):
    with open(folder / validation.VAL_LOG, "w") as f:
        for entry in entries:
            f.write(json.dumps(entry) + "\n")


def test_a_run_whose_held_out_validation_ends_near_chance_is_told_so(tmp_path):
    assert validation.learning_check(str(tmp_path)) is None   # no validation: nothing to say
    write_log(tmp_path, [{"step": 100, "pixel_auroc": 0.95}, {"step": 200, "pixel_auroc": 0.55}])
    check = validation.learning_check(str(tmp_path))
    assert check["step"] == 200 and check["held_out_pixel_auroc"] == 0.55
    assert "did not learn" in check["warning"] and "learning_curve.png" in check["warning"]
    assert "contact_sheet" in check["warning"]
    # the last validation counts: a run that learnt late is fine
    write_log(tmp_path, [{"step": 100, "pixel_auroc": 0.5}, {"step": 200, "pixel_auroc": 0.93}])
    assert validation.learning_check(str(tmp_path))["warning"] is None
