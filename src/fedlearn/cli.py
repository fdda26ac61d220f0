"""The `fedlearn` command: `fedlearn run` trains a federated model from flags and/or a YAML config."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from fedlearn import __version__
from fedlearn.errors import FedLearnError
from fedlearn.run.config import RunConfig, load_config_file

# flag -> (type, help); every flag is also a YAML key (dashes become underscores)
RUN_FLAGS: dict[str, tuple[type, str]] = {
    "--dataset": (str, "digits (built in), mnist, fashion-mnist, cifar10, femnist, pneumoniamnist, breastmnist, ..."),
    "--data-dir": (str, "folder holding the dataset's files (default data/<dataset>)"),
    "--model": (str, "seed-cnn, mcmahan-2nn, mcmahan-cnn, lenet5, resnet18-gn"),
    "--algorithm": (str, "fedavg, fedsgd, fedprox, fedavgm, fedadam, fedyogi, fedadagrad, scaffold (the registry's "
                    "strategies; their own settings follow the prefix rule --server-*, --client-*)"),
    "--task": (str, "classification, multilabel or regression (default: the dataset's)"),
    "--loss": (str, "cross-entropy, bce or mse: the loss (and so the task) to train with (default: the task's)"),
    "--personal-layers": (str, "comma-separated state_dict name patterns (e.g. 'fc2.*') of layers each client "
                          "keeps to itself: never sent, stored in its client state (FedPer-style) (default none: "
                          "all shared)"),
    "--mu": (float, "FedProx proximal coefficient"),
    "--clients": (int, "number of clients (default 10; under --partition natural, one per writer of the dataset)"),
    "--fraction": (float, "fraction of clients sampled per round, in (0, 1]"),
    "--min-clients": (int, "fewest successful clients for a round to update the model"),
    "--rounds": (int, "federated rounds (with --resume: total rounds to reach)"),
    "--local-epochs": (int, "local epochs per round"),
    "--batch-size": (int, "local batch size"),
    "--lr": (float, "learning rate (client SGD; the server step for fedsgd)"),
    "--momentum": (float, "client SGD momentum"),
    "--weight-decay": (float, "client SGD weight decay"),
    "--partition": (str, "iid, dirichlet, shards, quantity or natural"),
    "--alpha": (float, "Dirichlet concentration (smaller = more label skew)"),
    "--shards-per-client": (int, "shards per client for --partition shards"),
    "--min-partition-size": (int, "fewest training samples a client gets; 0 lets clients hold none (they are never "
                             "sampled), as W2 on digits needs"),
    "--update-bound": (float, "each client's update is scaled to at most this many times the previous round's "
                       "median update norm (round 1: the model's norm), bounding any one client's influence; 0: off"),
    "--max-examples-per-client": (int, "ceiling on the example counts a client may declare (its aggregation weight)"),
    "--client-test-fraction": (float, "share of each client's data held out as its local test set (default 0.2 "
                               "with --evaluation federated or both; 0 with centralized, where no one uses it)"),
    "--evaluation": (str, "centralized, federated or both"),
    "--dp": (str, "none; central: DP-FedAvg (clip, server-side Gaussian noise, Poisson sampling); local: clients "
             "clip and noise their own updates (untrusted server); dpsgd: sample-level DP-SGD in local training; "
             "distributed: clients add discrete Gaussian noise shares inside --secure-aggregation secagg or secagg+ "
             "(untrusted server)"),
    "--noise-multiplier": (float, "Gaussian noise std as a multiple of --clip-norm"),
    "--clip-norm": (float, "L2 bound on each client's update"),
    "--delta": (float, "DP delta (default min(1e-5, 1 / n^1.1) for n clients, or n training examples under "
                       "dpsgd)"),
    "--target-epsilon": (float, "privacy budget: calibrate the noise to it, or stop before exceeding it; under "
                         "dpsgd each client calibrates its own noise from its data size for --rounds rounds "
                         "(default none: no budget)"),
    "--client-budget": (float, "under --dp local or dpsgd: this client's own epsilon budget; it refuses any "
                        "training task that would exceed it, whatever the server asks (default none)"),
    "--target-mode": (str, "calibrate (choose --noise-multiplier for --rounds) or stop (end the run at the budget)"),
    "--accountant": (str, "rdp or pld (Google's dp-accounting)"),
    "--adaptive-clip-quantile": (float, "adapt --clip-norm to this quantile of update norms (Andrew et al. 2021) "
                                 "(default none: a fixed --clip-norm)"),
    "--secure-aggregation": (str, "none, secagg (Bonawitz et al. 2017) or secagg+ (Bell et al. 2020): the server "
                             "sees only the sum of the clients' updates"),
    "--secagg-threshold": (float, "clients needed to unmask: a fraction in (0.5, 1) of the sampled ones (default "
                                  "0.67) or a count; never half or fewer"),
    "--secagg-bits": (int, "bit width of the secure sum, Z_2^bits (default 32; at most 30 with --he ckks)"),
    "--secagg-clip": (float, "each update coordinate is clipped to [-clip, clip] before fixed-point encoding, "
                      "for SecAgg and --he alike (default: --clip-norm with --dp, else 1.0)"),
    "--secagg-neighbours": (int, "secagg+: neighbours per client (default: the fewest for which a client's input "
                                 "is exposed with probability at most 2^-40, from the two fractions below)"),
    "--secagg-corrupt-fraction": (float, "secagg+: fraction of clients assumed to collude with the server, which "
                                         "sets k and t (Bell et al.'s gamma; default 1/3)"),
    "--secagg-dropout-fraction": (float, "secagg+: fraction of clients assumed to drop out in a round (delta; "
                                         "default 0.1)"),
    "--secagg-max-weight": (int, "largest client sample count (the weight bound of SecAgg and --he; default: "
                                 "largest simulated client; needed by `fedlearn server`)"),
    "--he": (str, "none or ckks: clients encrypt their fixed-point weighted update with CKKS (TenSEAL); the "
             "server adds ciphertexts it cannot decrypt"),
    "--he-keys": (str, "folder from `fedlearn he keygen`, new for every run: public.ctx (everyone), group.key "
                  "(clients only), secret.ctx (key holder only) (default none)"),
    "--he-key-holder": (str, "client id that holds secret.ctx and decrypts the sum (default: the first answering "
                        "client, for simulations)"),
    "--seed": (int, "seed for every random choice"),
    "--threads": (int, "torch intra-op threads (1 is fastest for small models on 2 cores; at most 4 per core)"),
    "--seeded-privacy": (bool, "SIMULATION ONLY: derive privacy noise and secure-aggregation rounding from --seed "
                         "for reproducible tests; the run is then not private (summary.json says so)"),
    "--device": (str, "cpu, cuda, cuda:N or auto"),
    "--output": (str, "run directory (default runs/<timestamp>)"),
}
SERVER_FLAGS: dict[str, tuple[type, str]] = {
    "--round-timeout": (float, "seconds a round waits for client results before going on without them"),
    "--min-fit-fraction": (float, "fraction of a round's sampled clients that must succeed"),
}


def component_flags() -> dict[str, tuple[type, str]]:
    """Flags declared by registered components (server optimizers, client hooks, ...), from their Configs."""
    from fedlearn.registry import flag, settings

    out = {}
    for key, setting in settings().items():
        if flag(key) in RUN_FLAGS:
            continue
        kind = next((t for t in (bool, int, float, str) if t is setting.type or t.__name__ in str(setting.type)), str)
        owners = ", ".join(setting.owners)
        default = "" if "(default" in setting.help else f" ({_component_default(setting)})"
        out[flag(key)] = (kind, f"{setting.help} [{owners}]{default}")
    return out


def _component_default(setting: Any) -> str:
    """'default 0.9', or per owner where they differ: 'default 0.001 for adam, yogi; 0.01 for adagrad'."""
    import dataclasses

    from fedlearn.registry import KINDS, flag_name, lookup, names

    by_default: dict[str, list[str]] = {}
    for owner in setting.owners:  # owners of one key may be of several kinds (a strategy and a hook)
        for kind in (k for k in KINDS if owner in names(k)):
            for f in dataclasses.fields(lookup(kind, owner).Config):
                if flag_name(kind, f) == setting.key:
                    value = f.default if f.default is not dataclasses.MISSING else None
                    by_default.setdefault("none" if value is None else str(value), []).append(owner)
    if len(by_default) == 1:
        return f"default {next(iter(by_default))}"
    return "default " + "; ".join(f"{value} for {', '.join(owners)}" for value, owners in by_default.items())


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default: the value, 'off' for a switch, 'none' where unset means absent."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if action.required:
            return text + " (required)"
        if action.nargs == 0:  # a switch (store_true, store_const)
            return text + " (default off)"
        return text + (" (default none)" if action.default is None else " (default %(default)s)")


class FedLearnParser(argparse.ArgumentParser):
    """argparse with short errors: one usage line of the subcommand at fault, one `fedlearn: error:` line, exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:  # argparse would blame the top-level parser; the flag was given to the subcommand
            sub = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
            command = getattr(parsed, sub.dest, None) if sub is not None else None
            target = sub.choices.get(command, self) if sub is not None else self
            target.error(f"unrecognized arguments: {' '.join(extra)}")
        return parsed

    def error(self, message: str) -> Any:
        usage = " ".join(self.format_usage().split())
        if len(usage) > 120:  # `fedlearn run` has ~70 flags: their usage fills a screen
            usage = f"usage: {self.prog} [options] ({self.prog} --help lists them)"
        self.exit(2, f"{usage}\nfedlearn: error: {one_line(message)}\n")


def _add_config_flags(parser: argparse.ArgumentParser, flags: dict[str, tuple[type, str]]) -> None:
    parser.add_argument("--config", help="YAML file of config keys; flags override it")
    parser.add_argument("--no-download", action="store_true", help="never try to download missing datasets")
    defaults = RunConfig().to_dict()
    for flag, (kind, text) in {**flags, **component_flags()}.items():
        default = defaults.get(flag[2:].replace("-", "_"))
        if isinstance(default, bool):
            default = "on" if default else "off"
        shown = f" (default {default})" if default is not None and "(default" not in text else ""
        if kind is bool:
            parser.add_argument(flag, action="store_const", const=True, default=None, help=text + shown)
        else:
            parser.add_argument(flag, type=kind, default=None, help=text + shown)


def _add_process_flags(parser: argparse.ArgumentParser, insecure_help: str) -> None:
    """Flags that `fedlearn server` and `fedlearn client` share."""
    parser.add_argument("--insecure", action="store_true", help=insecure_help)
    parser.add_argument("--log-format", choices=["text", "json"], default="text", help="json: one object per line")


def build_parser() -> argparse.ArgumentParser:
    parser = FedLearnParser(prog="fedlearn", description="Federated learning of vision models.")
    parser.add_argument("--version", action="version", version=f"fedlearn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train a federated model in simulation")
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last completed round "
                     "(default: a new run)")
    run.add_argument("--quiet", action="store_true", help="no progress bar, per-round lines or table")
    run.add_argument("--dry-run", action="store_true", help="check the config (and --output, or DIR's config with "
                     "--resume), print it resolved as config.yaml would record it, and stop: trains and writes nothing")
    _add_config_flags(run, RUN_FLAGS)

    server = sub.add_parser("server", help="serve a run to `fedlearn client` processes over gRPC")
    server.add_argument("--address", default="127.0.0.1:8443", help="host:port to listen on (default 127.0.0.1:8443)")
    server.add_argument("--resume", metavar="DIR", help="continue the run in DIR after a crash or stop")
    server.add_argument("--cert", help="server certificate (PEM) for TLS")
    server.add_argument("--key", help="server private key (PEM)")
    server.add_argument("--client-ca", help="CA certificate clients must be signed by (mutual TLS)")
    server.add_argument("--tokens", help="file of client ids and token hashes (re-read on SIGHUP)")
    server.add_argument("--allowed-clients", metavar="IDS|@FILE",
                        help="the only client ids that may join: a comma list (site-a,site-b) or @FILE with one id "
                        "per line (re-read on SIGHUP); applies to certificate names and token owners alike")
    server.add_argument("--allow-any-client", action="store_true",
                        help="accept whatever client id a caller claims when neither --client-ca nor --tokens "
                        "authenticates clients (needed off loopback; on loopback the server issues per-run tokens "
                        "instead)")
    _add_process_flags(server, "allow plaintext on a non-loopback address")
    _add_config_flags(server, {**RUN_FLAGS, **SERVER_FLAGS})

    client = sub.add_parser("client", help="join a `fedlearn server` as one client")
    client.add_argument("--server", required=True, help="server host:port")
    client.add_argument("--client-id", help="this client's id (default: client-<partition index>)")
    client.add_argument("--partition-index", type=int, help="train on this share of the partitioned dataset")
    client.add_argument("--num-partitions", type=int, help="number of shares (the run's --clients)")
    client.add_argument("--ca", help="CA certificate that signed the server's certificate (enables TLS)")
    client.add_argument("--cert", help="this client's certificate (mutual TLS)")
    client.add_argument("--key", help="this client's private key (mutual TLS)")
    client.add_argument("--token-file", help="file holding this client's bearer token (default for a server on "
                        "this machine's loopback: the per-run token it issued, found via ~/.fedlearn/loopback/)")
    _add_process_flags(client, "allow plaintext to a non-loopback server")
    client.add_argument("--state-dir", help="folder for this client's own state (SCAFFOLD's control, DP-SGD's "
                        "accountant, personal layers); default fedlearn-client-state/<client id>")
    client.add_argument("--give-up-after", type=float, default=3600.0,
                        help="seconds without reaching the server before exiting (default 3600)")
    client.add_argument("--max-backoff", type=float, default=30.0,
                        help="longest wait in seconds between reconnect attempts (exponential backoff with jitter; "
                             "default 30)")
    _add_config_flags(client, {k: v for k, v in RUN_FLAGS.items() if k not in ("--output",)})

    certs = sub.add_parser("certs", help="development certificates for TLS and mutual TLS")
    certs.add_argument("action", choices=["init", "issue"], help="init: a new CA; issue NAME: a certificate")
    certs.add_argument("name", nargs="?", help="certificate name: 'server' or a client id such as site-a")
    certs.add_argument("--dir", default="certs", help="folder holding ca.pem and the issued files (default certs)")
    certs.add_argument("--host", action="append", help="server certificate SAN (repeatable; default localhost, "
                       "127.0.0.1, ::1)")
    certs.add_argument("--client", action="store_true", help="issue a client certificate (default for names "
                       "other than 'server')")
    certs.add_argument("--force", action="store_true", help="replace an existing CA or certificate")

    audit = sub.add_parser("audit", help="privacy audit: gradient inversion (DLG/iDLG) on FedSGD updates")
    audit.add_argument("--dataset", default="digits", help="images to attack (default digits)")
    audit.add_argument("--data-dir", help="folder holding the dataset's files")
    audit.add_argument("--images", type=int, default=8, help="how many single-image updates to attack")
    audit.add_argument("--image-size", type=int, default=32, help="images are resized to this side (default 32)")
    audit.add_argument("--iterations", type=int, default=None,
                       help="iterations per image (default 100 L-BFGS for dlg, 400 Adam for cosine)")
    audit.add_argument("--attack", default="dlg", help="dlg (Zhu et al. 2019, L-BFGS on the gradient distance) or "
                       "cosine (Geiping et al. 2020: cosine distance plus a total-variation prior, noise-robust)")
    audit.add_argument("--sweep", default=None, help="comma-separated noise multipliers to attack in turn, each "
                       "with its epsilon (e.g. 0,0.01,0.1,1); needs --clip-norm")
    audit.add_argument("--clip-norm", type=float, default=0.0, help="the defence: clip each update to this norm")
    audit.add_argument("--noise-multiplier", type=float, default=0.0, help="the defence: N(0, (z C)^2) noise")
    audit.add_argument("--compare", action="store_true", help="also attack without the defence, side by side")
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--output", default="audit", help="folder for grid PNGs and audit.json (default audit)")

    tokens = sub.add_parser("tokens", help="per-client bearer tokens (the server keeps only hashes)")
    tokens.add_argument("action", choices=["add"], help="add NAME: print a new token for client NAME")
    tokens.add_argument("name", help="client id")
    tokens.add_argument("--file", default="tokens.txt", help="the server's token file (default tokens.txt)")
    tokens.add_argument("--replace", action="store_true", help="replace NAME's existing token")

    he = sub.add_parser("he", help="CKKS keys for --he ckks (TenSEAL)")
    he.add_argument("action", choices=["keygen"], help="keygen: public.ctx for everyone, secret.ctx for the key "
                    "holder only")
    he.add_argument("--dir", default="he_keys", help="folder for the key files (default he_keys)")
    he.add_argument("--poly-modulus-degree", type=int, default=8192)
    he.add_argument("--coeff-mod-bit-sizes", type=int, nargs="+", default=[60, 40, 40])
    he.add_argument("--scale-bits", type=int, default=40)
    he.add_argument("--force", action="store_true", help="replace existing key files")

    export = sub.add_parser("export", help="export a run's final model for edge inference (ONNX, TorchScript)")
    export.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (fedlearn run --output)")
    export.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="default onnx")
    export.add_argument("--int8", action="store_true", help="onnx only: int8 post-training static quantization, "
                        "calibrated on a seeded sample of the run's training images")
    export.add_argument("--output", help="model file (default RUN_DIR/model.onnx, model.int8.onnx or "
                        "model.torchscript.pt)")
    export.add_argument("--data-dir", help="the run's dataset folder, if not where config.yaml says")
    export.add_argument("--calibration-images", type=int, default=256, help="--int8 calibration sample (default 256)")

    predict = sub.add_parser("predict", help="classify PNG/JPEG files with an exported ONNX model (onnxruntime)")
    predict.add_argument("model", metavar="MODEL", help="an .onnx file written by fedlearn export")
    predict.add_argument("images", metavar="IMAGE", nargs="+", help="PNG or JPEG files")
    predict.add_argument("--json", action="store_true", help="print one JSON array of predictions")
    predict.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    return parser


def config_from_args(args: argparse.Namespace) -> tuple[RunConfig | None, dict[str, Any]]:
    """The run config (None when resuming) and the flags given on the command line."""
    names = [f[2:].replace("-", "_") for f in (*RUN_FLAGS, *SERVER_FLAGS, *component_flags())]
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if args.no_download:
        given["download"] = False
    if getattr(args, "resume", None):
        extra = sorted(set(given) - {"rounds"})
        if extra or args.config:
            bad = "--config" if args.config else "--" + extra[0].replace("_", "-")
            raise FedLearnError(f"{bad} cannot change a resumed run; only --rounds may be given with --resume")
        return None, given
    config = RunConfig()
    if args.config:
        config = config.updated(load_config_file(args.config), source=args.config)
    return config.updated(given).validate(), given


def cmd_run(args: argparse.Namespace) -> int:
    from fedlearn.run.progress import RunProgress
    from fedlearn.run.runner import finish_run, prepare_run

    config, given = config_from_args(args)
    if args.dry_run:
        import yaml

        from fedlearn.run.runner import check_run

        checked = check_run(config, resume=args.resume, rounds=given.get("rounds"))
        print(yaml.safe_dump(checked.to_dict(), sort_keys=False), end="")
        return 0
    start = time.perf_counter()
    progress = RunProgress(enabled=not args.quiet)
    experiment, run_dir = prepare_run(
        config, resume=args.resume, rounds=given.get("rounds"), callbacks=[progress.update]
    )
    with progress.running(experiment.config, experiment.loop.round, metric=experiment.final_metric):
        experiment.loop.run(experiment.config.rounds)
    summary = finish_run(experiment, run_dir, time.perf_counter() - start)
    progress.summary(summary)
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from fedlearn.run.deploy import TLSFiles, serve

    config, given = config_from_args(args)
    tls = TLSFiles(cert=args.cert, key=args.key, ca=args.client_ca)
    summary = serve(config, args.address, tls=tls, tokens=args.tokens, allowed_clients=args.allowed_clients,
                    allow_any_client=args.allow_any_client, insecure=args.insecure, resume=args.resume,
                    rounds=given.get("rounds"))
    return int(summary.get("exit_code", 0))  # stopped by a signal: 128 + its number (130 SIGINT, 143 SIGTERM)


def cmd_client(args: argparse.Namespace) -> int:
    from fedlearn.run.deploy import TLSFiles, run_client

    config, _ = config_from_args(args)
    if args.num_partitions is not None:
        config = config.updated({"clients": args.num_partitions}).validate()
    tls = TLSFiles(cert=args.cert, key=args.key, ca=args.ca)
    run_client(config, args.server, client_id=args.client_id, partition_index=args.partition_index, tls=tls,
               token_file=args.token_file, insecure=args.insecure, give_up_after=args.give_up_after,
               state_dir=args.state_dir, max_backoff=args.max_backoff)
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fedlearn.security import DEFAULT_SERVER_HOSTS, init_ca, issue

    folder = Path(args.dir)
    if args.action == "init":
        paths = init_ca(folder, force=args.force)
        print(f"CA written: {paths.cert} (key {paths.key}, keep it private)")
        return 0
    if not args.name:
        raise FedLearnError("certs issue needs a NAME: 'server' or a client id such as site-a")
    is_server = args.name == "server" and not args.client
    hosts = args.host or list(DEFAULT_SERVER_HOSTS)
    paths = issue(folder, args.name, server=is_server, hosts=hosts if is_server else None, force=args.force)
    kind = f"server certificate for {', '.join(hosts)}" if is_server else f"client certificate for {args.name}"
    print(f"{kind}: {paths.cert} (key {paths.key})")
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from fedlearn.security import TokenStore

    token = TokenStore(args.file, missing_ok=True).add(args.name, replace=args.replace)
    print(token)
    print(f"added {args.name} to {args.file}; give the line above to that client (it is not stored) "
          "and send the server SIGHUP", file=sys.stderr)
    return 0


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(args: argparse.Namespace) -> None:
    """Servers and clients log progress at INFO; `run` shows a progress bar and logs only warnings."""
    handler = logging.StreamHandler()
    if getattr(args, "log_format", "text") == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if args.command in ("server", "client") else logging.WARNING,
                        handlers=[handler])
    # dp-accounting logs every RDP order it skips for small noise; the epsilon it returns is still right
    logging.getLogger("absl").setLevel(logging.ERROR)


def cmd_audit(args: argparse.Namespace) -> int:
    """Attack single-image FedSGD updates of an untrained sigmoid LeNet (DLG's model) and report what leaks."""
    from pathlib import Path

    import torch

    from fedlearn.attacks import DLGLeNet, audit, audit_images, save_grid

    torch.set_num_threads(1)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = audit_images(args.dataset, args.images, args.image_size, data_dir=args.data_dir)
    settings = [("defended", args.clip_norm, args.noise_multiplier)]
    if args.compare:
        settings.insert(0, ("undefended", 0.0, 0.0))
    if args.sweep is not None:
        import math

        from fedlearn.errors import ConfigError

        try:
            sweep = [float(z) for z in args.sweep.split(",") if z.strip()]
        except ValueError:
            raise ConfigError(f"--sweep must be comma-separated noise multipliers, e.g. 0,0.1,1; got "
                              f"{args.sweep!r}") from None
        if not sweep or any(not (math.isfinite(z) and z >= 0) for z in sweep) or args.clip_norm <= 0:
            raise ConfigError("--sweep needs noise multipliers >= 0 and a --clip-norm > 0 (noise is relative to it)")
        settings = [(f"z={z:g}", args.clip_norm, z) for z in sweep]
    report = {}
    for name, clip, noise in settings:
        torch.manual_seed(args.seed)
        model = DLGLeNet(images.shape[1], 10, args.image_size)
        result = audit(model, images, labels, clip_norm=clip, noise_multiplier=noise,
                       iterations=args.iterations, seed=args.seed, attack=args.attack)
        grid = save_grid(result.originals, result.reconstructions, out / f"grid_{name}.png")
        report[name] = result.summary()
        epsilon = report[name]["epsilon"]
        print(f"{name} ({args.attack}): clip {clip:g}, noise multiplier {noise:g} (epsilon "
              f"{'inf' if epsilon is None else f'{epsilon:.3g}'} for this one release): labels recovered "
              f"{result.label_accuracy:.0%}, PSNR mean {result.mean_psnr:.1f} dB / median {result.median_psnr:.1f} dB "
              f"(a blank gray guess scores {report[name]['baseline_psnr_db']:.1f} dB); grid: {grid}")
    (out / "audit.json").write_text(json.dumps(report, indent=1))
    print("A low PSNR shows that this attack fails on this model, not that no attack could succeed.")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export RUN_DIR's final global model with its preprocessing metadata embedded."""
    import torch

    from fedlearn.export import export_run

    torch.set_num_threads(1)
    result = export_run(args.run_dir, args.output, format=args.format, int8=args.int8, data_dir=args.data_dir,
                        calibration_images=args.calibration_images)
    meta = result.metadata
    shape = "x".join(map(str, meta.input_shape))
    print(f"exported {meta.model} ({meta.dataset}, input {shape} {meta.color_mode}, mean {list(meta.mean)}, "
          f"std {list(meta.std)}) as {result.format} to {result.path} ({result.size_bytes / 1e6:.2f} MB)")
    if meta.quantization != "none":
        print(f"{meta.quantization}; calibrated on {meta.calibration['images']} training images")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify image files with an exported ONNX model; one line per image, or JSON."""
    from fedlearn.export import predict_images

    predictions = predict_images(args.model, args.images, threads=args.threads)
    if args.json:
        print(json.dumps([p.to_dict() for p in predictions], indent=1))
    else:
        for p in predictions:
            print(f"{p.image}: {p.label} (p={p.probability:.3f})")
    return 0


def cmd_he(args: argparse.Namespace) -> int:
    from fedlearn.privacy.he import CKKSParams, generate_keys, precision_check

    params = CKKSParams(args.poly_modulus_degree, tuple(args.coeff_mod_bit_sizes), args.scale_bits)
    files = generate_keys(args.dir, params, force=args.force)
    check = precision_check(params, num_summands=10, length=params.slots)
    print(f"wrote {files.public_context} (give to the server and every client), {files.group_key} (every client; "
          f"never the server), {files.secret_context} (the key holder only; never the server), {files.info}")
    print(f"public context fingerprint {files.fingerprint}; precision check: max error "
          f"{check['max_abs_error']:.2e} over a sum of 10 (bound {check['bound']:.2e})")
    return 0


COMMANDS = {"run": cmd_run, "server": cmd_server, "client": cmd_client, "certs": cmd_certs, "tokens": cmd_tokens,
            "he": cmd_he, "audit": cmd_audit, "export": cmd_export, "predict": cmd_predict}


INTERRUPTED = {
    "run": "fedlearn: interrupted; completed rounds are saved, continue with --resume DIR",
    "server": "fedlearn: interrupted; completed rounds are saved, continue with --resume DIR",
    "client": "fedlearn: client interrupted; start the same command again to rejoin the run",
}


def one_line(message: str) -> str:
    """An error message as one line: line breaks a path or value carried into it are shown escaped, and so are
    characters no terminal can print (a lone surrogate from an undecodable argument)."""
    message = message.replace("\r", "\\r").replace("\n", "\\n")
    return message.encode("utf-8", "backslashreplace").decode("utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and --version exit 0 as argparse does; a usage error is exit 2
        if exc.code == 2:
            return 2
        raise
    configure_logging(args)
    # gRPC's C core logs every failed handshake of a stranger at INFO: keep it to real errors unless asked
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    try:
        return COMMANDS[args.command](args)
    except FedLearnError as exc:
        print(f"fedlearn: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED.get(args.command, "fedlearn: interrupted"), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
