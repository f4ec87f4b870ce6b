"""
nanoGPT's configurator, hardened. A trainer defines its defaults as module globals, then:

    with exit_on_config_error():
        config = configure(globals(), sys.argv[1:])   # config/x.py files, then --key=value overrides
        check(warmup_iters < max_iters, f"warmup_iters ({warmup_iters}) must be < max_iters ({max_iters})")

Every name a config file sets must already be a default (names starting with '_' are scratch), so a
typo is an error with a suggestion, not a silently ignored line. Errors are ConfigError: one line, exit 2.
"""
import ast, contextlib, difflib, json, os, signal, sys, time

class ConfigError(Exception):
    """A bad config file, override or cross-check; scripts print it as one line (exit_on_config_error)."""

def _unknown(key, keys, where):
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}' in {where}{hint}")

def _coerce(value, default, raw, where):
    """Check `value` against the default's type; `raw` is what the user typed, for the error message."""
    if default is None or isinstance(default, str) and isinstance(value, str):
        return value
    if isinstance(default, str):
        return str(raw)  # str accepts anything: --out_dir=123 means the string '123'
    if isinstance(default, bool):  # test bool before int: bool is a subclass of int
        if isinstance(value, bool):
            return value
        if str(value).lower() in ('true', '1', 'false', '0'):  # also catches the ints 1/0
            return str(value).lower() in ('true', '1')
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)  # --learning_rate=1 is fine
    elif isinstance(value, type(default)) and not isinstance(value, bool):
        return value
    raise ConfigError(f"{where} expects {type(default).__name__}, got {raw!r}")

def configure(defaults, argv, verbose=None):
    """Apply config files and --key=value overrides (in argv order) to `defaults` in place, usually
    the caller's globals(). Returns {key: value} of all config keys, for logging and checkpoints."""
    keys = [k for k, v in defaults.items() if not k.startswith('_')
            and isinstance(v, (int, float, bool, str, tuple, list, type(None)))]
    verbose = os.environ.get('RANK', '0') == '0' if verbose is None else verbose  # print on rank 0 only
    for arg in argv:
        if not arg.startswith('--'):  # a config file: plain Python assignments
            if not os.path.isfile(arg):
                raise ConfigError(f"config file not found: {arg}")
            env = {k: defaults[k] for k in keys}  # the file can read current values: warmup = max_iters // 10
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, 'exec'), env)
            except Exception as e:  # a broken config file is a usage error too
                raise ConfigError(f"in config file {arg}: {type(e).__name__}: {e}") from e
            changed = [k for k, v in env.items()  # new names, and keys the file assigned
                       if not k.startswith('_') and (k not in keys or v is not defaults[k])]
            for k in changed:
                if k not in keys:
                    raise _unknown(k, keys, arg)
                defaults[k] = _coerce(env[k], defaults[k], env[k], f"{k} in {arg}")
            if verbose:
                print(f"config {arg}: " + ", ".join(f"{k}={defaults[k]!r}" for k in changed))
        else:
            if '=' not in arg:
                raise ConfigError(f"expected --key=value or a config file, got {arg!r}")
            k, raw = arg[2:].split('=', 1)
            if k not in keys:
                raise _unknown(k, keys, arg)
            try:
                value = ast.literal_eval(raw)
            except (ValueError, TypeError, SyntaxError):
                value = raw  # not a Python literal: keep it as a plain string
            defaults[k] = _coerce(value, defaults[k], raw, f"--{k}")
            if verbose:
                print(f"override {k} = {defaults[k]!r}")
    return {k: defaults[k] for k in keys}

def check(condition, message):
    """One-line cross-check after configure(), e.g. check(warmup_iters < max_iters, '...')."""
    if not condition:
        raise ConfigError(message)

@contextlib.contextmanager
def exit_on_config_error():
    """Turn a ConfigError into one line on stderr and exit code 2 (bad usage), not a traceback."""
    try:
        yield
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

# ----------------------------------------------------------------------------------------------
# The start of a training run, the same in every trainer

class StopFlag:
    """Set by Ctrl+C (SIGINT) or SIGTERM: the loop finishes its step, saves and exits, so no work is lost."""
    def __init__(self):
        self.requested = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        self.requested = True

def start_run(out_dir, config, header, wandb_log=False, wandb_project='', wandb_run_name='', say=print):
    """Rank 0: out_dir/log.txt gets a dated header line and the config; wandb starts when asked (not installed,
    no login or no network only switch it off). -> the wandb run, or None."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'log.txt'), 'a') as f:
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {header}\n# config {json.dumps(config)}\n")
    if not wandb_log:
        return None
    try:
        import wandb
        return wandb.init(project=wandb_project, name=wandb_run_name or None, config=config)
    except Exception as e:  # keep training
        say(f"wandb disabled ({type(e).__name__}: {e})")
        return None
