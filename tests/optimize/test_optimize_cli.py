"""`segment`, `eval` and `bench` run the model ``twins_timm.optimize`` made, and the removed `--kernels`
option (the kernel table of earlier versions) is refused by argparse before any work."""
from __future__ import annotations

import pytest
from PIL import Image

from tools_standin import random_rgb
from twins_timm import cli
from twins_timm.models.twins import Block
from twins_timm.optimize.layers import InplaceGELU


def test_segment_optimizes_the_model(tmp_path, standin):
    Image.fromarray(random_rgb(30, 40, 1)).save(tmp_path / 'a.png')
    standin.block = Block(8, 1, ws=1)  # a Twins block beside the stand-in's layers (its forward never calls it)
    assert cli.main(['segment', str(tmp_path / 'a.png'), '--scale', '64', '32', '--device', 'cpu', '--quiet',
                     '--out', str(tmp_path / 'out')]) == 0
    assert type(standin.block.mlp.act) is InplaceGELU  # the tool optimized the model


@pytest.mark.parametrize('command', ['segment', 'eval', 'bench'])
def test_the_removed_kernels_option_is_refused_before_the_work(tmp_path, standin, capsys, command):
    Image.fromarray(random_rgb(8, 8)).save(tmp_path / 'a.png')
    out = tmp_path / 'out'
    args = {'segment': ['segment', str(tmp_path / 'a.png'), '--out', str(out)],
            'eval': ['eval', '--data', str(tmp_path), '--json', str(out / 'eval.json')],
            'bench': ['bench', '--quick', '--json', str(out / 'bench.json')]}[command]
    with pytest.raises(SystemExit) as e:
        cli.main(args + ['--kernels', 'rows'])
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'unrecognized arguments: --kernels rows' in err and 'Traceback' not in err
    assert not out.exists() and standin.calls == []
