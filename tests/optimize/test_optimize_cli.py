"""`--kernels` of `segment`, `eval` and `bench`: the kernel table of the model the tools optimize
(``twins_timm.optimize``), and a wrong value refused before any work."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from tools_standin import random_rgb
from twins_timm import cli
from twins_timm.models.twins import Block
from twins_timm.optimize import kernel_choices
from twins_timm.optimize.layers import FastBlock


def test_segment_optimizes_the_model_with_the_kernels_given(tmp_path, standin):
    Image.fromarray(random_rgb(30, 40, 1)).save(tmp_path / 'a.png')
    base = ['segment', str(tmp_path / 'a.png'), '--scale', '64', '32', '--device', 'cpu', '--quiet']
    standin.block = Block(8, 1, ws=1)  # a Twins block beside the stand-in's layers (its forward never calls it)
    assert cli.main(base + ['--out', str(tmp_path / 'fixed'), '--kernels', 'rows']) == 0
    assert type(standin.block) is FastBlock  # the tool optimized the model
    assert standin.block.kernel_table.policy == 'rows' and kernel_choices(standin) == {}
    saved = {'mlp:4096,8,32,float32': 'rows'}  # a table saved from an earlier run (bench: kernels.choices)
    path = tmp_path / 'kernels.json'
    path.write_text(json.dumps(saved))
    assert cli.main(base + ['--out', str(tmp_path / 'saved'), '--kernels', str(path)]) == 0
    assert standin.block.kernel_table.policy == 'saved' and kernel_choices(standin) == saved
    assert path.read_text() == json.dumps(saved)  # read, never written


@pytest.mark.parametrize('value', ['fastest', 'missing.json', 'list.json', 'onednn'])
@pytest.mark.parametrize('command', ['segment', 'bench'])
def test_a_wrong_kernels_value_is_one_paragraph_before_the_work(tmp_path, standin, capsys, command, value):
    (tmp_path / 'list.json').write_text('[1, 2]')
    Image.fromarray(random_rgb(8, 8)).save(tmp_path / 'a.png')
    out = tmp_path / 'out'
    args = {'segment': ['segment', str(tmp_path / 'a.png'), '--out', str(out)],
            'bench': ['bench', '--quick', '--json', str(out / 'bench.json')]}[command]
    code = cli.main(args + ['--kernels', str(tmp_path / value) if value.endswith('.json') else value])
    err = capsys.readouterr().err
    assert code == 2 and 'kernel' in err and 'Traceback' not in err
    assert not out.exists() and standin.calls == []
