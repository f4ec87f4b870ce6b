"""configurator.py: config files, --key=value overrides, type checks, cross-checks, exit code."""
import os, subprocess, sys
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # plain `pytest` does not put the repo root on sys.path
from configurator import ConfigError, configure, check


def defaults():
    import math  # modules, functions and _private names in globals() are not config keys
    return dict(learning_rate=6e-4, max_iters=5000, warmup_iters=100, compile=True, out_dir='out',
                init_from=None, betas=(0.9, 0.99), math=math, _scratch=1)

def run(argv):
    g = defaults()
    return g, configure(g, argv, verbose=False)

def test_defaults_pass_through():
    g, cfg = run([])
    assert cfg == dict(learning_rate=6e-4, max_iters=5000, warmup_iters=100, compile=True, out_dir='out',
                       init_from=None, betas=(0.9, 0.99))

def test_config_file_applied_then_overrides(tmp_path):
    f = tmp_path / 'x.py'
    f.write_text("# a config\nmax_iters = 200\n_steps = 4\nwarmup_iters = max_iters // _steps\nout_dir = 'out-x'\n")
    g, cfg = run([str(f), '--max_iters=300'])
    assert (cfg['max_iters'], cfg['warmup_iters'], cfg['out_dir']) == (300, 50, 'out-x')
    assert g['max_iters'] == 300 and '_steps' not in cfg  # globals updated in place

def test_unknown_key_in_file_suggests(tmp_path):
    f = tmp_path / 'x.py'
    f.write_text("learning_rat = 1e-3\n")
    with pytest.raises(ConfigError) as e:
        run([str(f)])
    assert str(e.value) == f"unknown config key 'learning_rat' in {f} (did you mean 'learning_rate'?)"

def test_unknown_key_in_override_suggests():
    with pytest.raises(ConfigError) as e:
        run(['--max_iter=3'])
    assert str(e.value) == "unknown config key 'max_iter' in --max_iter=3 (did you mean 'max_iters'?)"
    with pytest.raises(ConfigError) as e:
        run(['--zzz=3'])
    assert 'did you mean' not in str(e.value)
    with pytest.raises(ConfigError, match='expected --key=value'):
        run(['--max_iters'])
    with pytest.raises(ConfigError, match='config file not found'):
        run(['config/nope.py'])

def test_broken_config_file(tmp_path):
    f = tmp_path / 'x.py'
    f.write_text("import os\n")
    with pytest.raises(ConfigError, match="unknown config key 'os'"):
        run([str(f)])
    f.write_text("max_iters = 2 *\n")
    with pytest.raises(ConfigError, match=f"in config file {f}: SyntaxError"):
        run([str(f)])
    f.write_text("max_iters = [warmup_iters * i for i in range(2)][1] + undefined_name\n")
    with pytest.raises(ConfigError, match="NameError: name 'undefined_name' is not defined"):
        run([str(f)])

def test_types():
    _, cfg = run(['--learning_rate=1', '--max_iters=10', '--out_dir=123', '--betas=(0.9,0.95)'])
    assert cfg['learning_rate'] == 1.0 and isinstance(cfg['learning_rate'], float)  # int accepted for float
    assert cfg['max_iters'] == 10 and cfg['out_dir'] == '123' and cfg['betas'] == (0.9, 0.95)
    with pytest.raises(ConfigError) as e:
        run(['--learning_rate=abc'])
    assert str(e.value) == "--learning_rate expects float, got 'abc'"
    with pytest.raises(ConfigError, match="--max_iters expects int, got '1e4'"):
        run(['--max_iters=1e4'])
    with pytest.raises(ConfigError, match="--max_iters expects int, got 'True'"):
        run(['--max_iters=True'])

def test_none_default_accepts_anything():
    assert run(['--init_from=resume'])[1]['init_from'] == 'resume'
    assert run(['--init_from=3'])[1]['init_from'] == 3

@pytest.mark.parametrize('raw,want', [('True', True), ('false', False), ('1', True), ('0', False), ('FALSE', False)])
def test_bool_parsing(raw, want):
    assert run([f'--compile={raw}'])[1]['compile'] is want

def test_bool_rejects_other_values(tmp_path):
    with pytest.raises(ConfigError, match="--compile expects bool, got 'yes'"):
        run(['--compile=yes'])
    f = tmp_path / 'x.py'
    f.write_text("learning_rate = 'fast'\n")
    with pytest.raises(ConfigError, match=f"learning_rate in {f} expects float, got 'fast'"):
        run([str(f)])

def test_cross_check():
    g, _ = run(['--warmup_iters=9000'])
    check(g['max_iters'] > 0, 'never raised')
    with pytest.raises(ConfigError, match=r'warmup_iters \(9000\) must be < max_iters \(5000\)'):
        check(g['warmup_iters'] < g['max_iters'],
              f"warmup_iters ({g['warmup_iters']}) must be < max_iters ({g['max_iters']})")

def test_script_exits_2_with_one_line(tmp_path):
    script = tmp_path / 'train.py'
    script.write_text("import sys\nfrom configurator import configure, check, exit_on_config_error\n"
                      "max_iters = 10\nwarmup_iters = 2\n"
                      "with exit_on_config_error():\n"
                      "    configure(globals(), sys.argv[1:])\n"
                      "    check(warmup_iters < max_iters, 'warmup_iters must be < max_iters')\n"
                      "print('ok', max_iters)\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, str(script), '--max_iter=3'], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stdout == ''
    assert r.stderr == "error: unknown config key 'max_iter' in --max_iter=3 (did you mean 'max_iters'?)\n"
    r = subprocess.run([sys.executable, str(script), '--warmup_iters=20'], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr == "error: warmup_iters must be < max_iters\n"
    r = subprocess.run([sys.executable, str(script), '--max_iters=7'], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and r.stdout.splitlines() == ['override max_iters = 7', 'ok 7']
