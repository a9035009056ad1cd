"""fairseq-train that kills itself with SIGKILL at one reproducible moment of its save path,
named by $FWP_KILL_AT = "<stage>:<n>:<when>" (no variable: an ordinary fairseq-train), for
test_kill_resume.py. Counted per process, on files whose name starts with "checkpoint":

  step:<n>:before     before the n-th training update of this process
  save:<n>:mid        inside the n-th torch.save of a checkpoint: half of it written to its .tmp
  rename:<n>:before|after   around fairseq's n-th rename of a finished checkpoint .tmp
  copy:<n>:mid        inside the n-th file copy (checkpoint_best.pt / checkpoint_last.pt):
                      half of the source written to the copy's destination
  replace:<n>:before|after  around the n-th os.replace (the atomic copy's rename)

Before dying it prints "FWP_KILLED <moment> <file>"."""
import io
import os
import shutil
import signal
import sys

from fairseq import checkpoint_utils
from fairseq import trainer as trainer_module
from fairseq_cli import train

_calls = {}


def _die(moment, path):
    print(f"FWP_KILLED {moment} {path}", flush=True)
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _install(moment):
    stage, n, when = moment.split(":")

    def hit(name, path):
        if not os.path.basename(str(path)).startswith("checkpoint"):
            return False
        _calls[name] = _calls.get(name, 0) + 1
        return name == stage and _calls[name] == int(n)

    step = trainer_module.Trainer.train_step

    def train_step(self, *args, **kwargs):
        if hit("step", "checkpoint"):
            _die(moment, f"update {self.get_num_updates() + 1}")
        return step(self, *args, **kwargs)

    save = checkpoint_utils._torch_persistent_save

    def persistent_save(obj, f):
        if hit("save", getattr(f, "name", "checkpoint")):
            buf = io.BytesIO()
            checkpoint_utils.torch.save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            _die(moment, f.name)
        return save(obj, f)

    def around(name, fn):
        def wrapper(src, dst, *args, **kwargs):
            if not hit(name, dst):
                return fn(src, dst, *args, **kwargs)
            if when == "before":
                _die(moment, dst)
            if when == "mid":
                with open(src, "rb") as s, open(dst, "wb") as d:
                    data = s.read()
                    d.write(data[: len(data) // 2])
                _die(moment, dst)
            out = fn(src, dst, *args, **kwargs)
            _die(moment, dst)
            return out
        return wrapper

    trainer_module.Trainer.train_step = train_step
    checkpoint_utils._torch_persistent_save = persistent_save
    os.rename = around("rename", os.rename)
    shutil.copyfile = around("copy", shutil.copyfile)
    os.replace = around("replace", os.replace)


if __name__ == "__main__":
    if os.environ.get("FWP_KILL_AT"):
        _install(os.environ["FWP_KILL_AT"])
    sys.argv[0] = "fairseq-train"
    train.cli_main()
