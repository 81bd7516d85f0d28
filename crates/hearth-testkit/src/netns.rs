//! Several hosts on one machine for tests: network namespaces joined by veth pairs (root only).
//!
//! [`Hosts::new`] makes one namespace per host plus one "switch" namespace that holds a Linux bridge.
//! Each host's `eth0` is one end of a veth pair whose other end (`h<i>`) is a port of that bridge, so every
//! host reaches every other host by IP over a real network stack, and the whole set lives in namespaces of
//! its own: nothing is added to the machine's own network. A bridge rather than a veth pair per pair of
//! hosts keeps the set-up linear in the number of hosts and lets one host be cut off ([`Hosts::cut`]) by
//! taking down its switch port, which drops its packets silently like a pulled cable rather than
//! refusing connections.
//!
//! Names are `hearth-<pid>-<random hex>-<i>` (hosts) and `hearth-<pid>-<random hex>-sw` (the switch), so
//! runs in parallel never collide, and [`cleanup_stale`] can tell which namespaces a dead process left.
//! Like the rest of the test kit this never skips: without root it fails with an error saying so.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};

/// Every namespace this module makes starts with this.
pub const NAME_PREFIX: &str = "hearth-";

/// The name of each host's network interface.
pub const HOST_INTERFACE: &str = "eth0";

/// Where `ip netns` keeps the named namespaces.
const NETNS_DIR: &str = "/run/netns";

/// The largest number of hosts: addresses are `10.X.0.1` to `10.X.0.253` in one /24.
pub const MAX_HOSTS: usize = 253;

/// A set of hosts (network namespaces) that can reach each other; removed again when dropped.
#[derive(Debug)]
pub struct Hosts {
    /// `hearth-<pid>-<random>-`, shared by every namespace of this set.
    prefix: String,
    /// The namespace holding the bridge, once made.
    switch: Option<String>,
    /// The hosts' namespaces, in host order, as far as they have been made.
    hosts: Vec<String>,
    addrs: Vec<Ipv4Addr>,
}

impl Hosts {
    /// Makes `n` hosts, each with loopback up and `eth0` at `10.<random>.0.<i+1>/24`, all on one bridge.
    /// Fails (never skips) when not run as root or when `ip` is missing. Also removes namespaces left
    /// behind by test processes that died ([`cleanup_stale`]), on a best-effort basis.
    pub fn new(n: usize) -> Result<Hosts> {
        if n == 0 || n > MAX_HOSTS {
            bail!("Hosts::new needs between 1 and {MAX_HOSTS} hosts, not {n}");
        }
        check_root()?;
        // Leftovers from killed test runs only cost a little memory, so a failure here must not fail the
        // test that happens to come next; it is reported and the set-up goes on.
        if let Err(e) = cleanup_stale() {
            eprintln!("netns: could not clean up stale namespaces: {e:#}");
        }
        let prefix = format!(
            "{NAME_PREFIX}{}-{:08x}-",
            std::process::id(),
            rand::random::<u32>()
        );
        let subnet = rand::random::<u8>();
        // Built up step by step so that, if a step fails, dropping the partial set removes what was made.
        let mut hosts = Hosts {
            prefix,
            switch: None,
            hosts: Vec::with_capacity(n),
            addrs: Vec::with_capacity(n),
        };
        let switch = format!("{}sw", hosts.prefix);
        ip(&["netns", "add", &switch])?;
        hosts.switch = Some(switch.clone());
        ip(&["-n", &switch, "link", "set", "lo", "up"])?;
        ip(&["-n", &switch, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &switch, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let name = format!("{}{i}", hosts.prefix);
            ip(&["netns", "add", &name])?;
            hosts.hosts.push(name.clone());
            let port = switch_port(i);
            // Both ends are made directly inside their namespaces, so no interface name is ever taken in
            // the machine's own namespace and parallel runs cannot clash on `eth0` or `h0`.
            ip(&[
                "-n",
                &switch,
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                HOST_INTERFACE,
                "netns",
                &name,
            ])?;
            ip(&["-n", &switch, "link", "set", &port, "master", "br0", "up"])?;
            let addr = Ipv4Addr::new(10, subnet, 0, host_octet(i));
            ip(&[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                HOST_INTERFACE,
            ])?;
            ip(&["-n", &name, "link", "set", HOST_INTERFACE, "up"])?;
            ip(&["-n", &name, "link", "set", "lo", "up"])?;
            hosts.addrs.push(addr);
        }
        Ok(hosts)
    }

    /// The number of hosts.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Always false: a set has at least one host.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Host `i`'s address. Panics if `i >= len()`, like indexing a slice.
    pub fn addr(&self, i: usize) -> IpAddr {
        IpAddr::V4(self.addrs[i])
    }

    /// Host `i`'s address with `port`. Panics if `i >= len()`.
    pub fn socket_addr(&self, i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(self.addr(i), port)
    }

    /// Host `i`'s namespace name, for `ip netns exec NAME …`. Panics if `i >= len()`.
    pub fn name(&self, i: usize) -> &str {
        &self.hosts[i]
    }

    /// The prefix every namespace of this set starts with (`hearth-<pid>-<random>-`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A command that runs `program` on host `i` (`ip netns exec <ns> program …`); add arguments to it as
    /// usual. Like [`crate::command`], the CA-bundle variables are removed from its environment. Processes
    /// still running on a host when the set is dropped are killed. Panics if `i >= len()`.
    ///
    /// `ip netns exec` also gives the program a mount namespace of its own (to mount the host's `/sys`).
    /// Where `/` is a private mount, as on this machine and in many containers, mounts made after the
    /// program started (a loop-device btrfs, say) are not visible to it: mount first, then start the
    /// long-running processes that must see the mount.
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = crate::command("ip");
        cmd.args(["netns", "exec", self.name(i)]).arg(program);
        cmd
    }

    /// Shapes host `i`'s link in both directions: `delay_ms` of one-way delay added on each side of the
    /// link (so a round trip to host `i` gains twice that) and at most `rate_mbit` Mbit/s each way
    /// (0 = unlimited). `shape(i, 0, 0)` removes the shaping. Delay needs the kernel's netem qdisc; a kernel
    /// without it gives an error naming it (a rate alone uses tbf, which is more widely built).
    pub fn shape(&self, i: usize, delay_ms: u32, rate_mbit: u32) -> Result<()> {
        let switch = self.switch_name()?;
        let port = switch_port(i);
        for (ns, dev) in [(self.name(i), HOST_INTERFACE), (switch, port.as_str())] {
            shape_device(ns, dev, delay_ms, rate_mbit)
                .with_context(|| format!("shaping host {i}'s link ({dev} in {ns})"))?;
        }
        Ok(())
    }

    /// Cuts host `i` off from every other host by taking its switch port down. Packets to and from it are
    /// dropped without an answer (connections hang rather than being refused), as when a cable is pulled;
    /// the host's own interface and address stay as they were.
    pub fn cut(&self, i: usize) -> Result<()> {
        let switch = self.switch_name()?;
        ip(&["-n", switch, "link", "set", &switch_port(i), "down"])
            .with_context(|| format!("cutting host {i} off"))
    }

    /// Undoes [`Hosts::cut`]: host `i`'s switch port comes up again and traffic flows (the bridge runs no
    /// spanning tree, so forwarding starts at once).
    pub fn heal(&self, i: usize) -> Result<()> {
        let switch = self.switch_name()?;
        ip(&["-n", switch, "link", "set", &switch_port(i), "up"])
            .with_context(|| format!("reconnecting host {i}"))
    }

    fn switch_name(&self) -> Result<&str> {
        self.switch
            .as_deref()
            .ok_or_else(|| anyhow!("the switch namespace was never made"))
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        // Hosts first, then the switch: deleting a namespace destroys its veth ends and with them their
        // peers, so no link outlives the set. A namespace stays alive while a process runs in it, so
        // processes left running on a host (a server the test did not stop, or one a panic skipped) are
        // killed first. Errors cannot be returned from Drop; they are printed for the test log.
        for ns in self.hosts.iter().chain(self.switch.iter()) {
            if let Err(e) = remove_namespace(ns) {
                eprintln!("netns: could not remove namespace {ns}: {e:#}");
            }
        }
    }
}

/// Removes `hearth-<pid>-<hex>-…` namespaces whose process is gone (or whose pid now belongs to a process
/// that started after the namespace was made), as left behind by test runs that were killed. Processes
/// still inside such a namespace are not touched; the name is only unmounted. Returns the removed names.
pub fn cleanup_stale() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {NETNS_DIR}")),
    };
    let own = std::process::id();
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {NETNS_DIR}"))?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let Some(pid) = creator_pid(&name) else {
            continue;
        };
        if pid == own {
            continue;
        }
        // A namespace whose age cannot be read is left alone: it may be in the middle of being made.
        let Ok(made) = entry.metadata().and_then(|m| m.modified()) else {
            continue;
        };
        if !is_stale(made, process_start(pid)) {
            continue;
        }
        // Another process may remove the same leftover at the same moment; that is fine.
        if ip(&["netns", "del", &name]).is_ok() {
            removed.push(name);
        }
    }
    Ok(removed)
}

/// The pid in a name of the form `hearth-<pid>-<hex>-<rest>`, or None for any other name.
fn creator_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(NAME_PREFIX)?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let tag = parts.next()?;
    let _suffix = parts.next()?;
    if tag.is_empty() || !tag.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(pid)
}

/// Whether a namespace made at `made` belongs to no living process: its creator's pid is not running, or
/// runs a process that started clearly after the namespace was made (the pid was reused).
fn is_stale(made: SystemTime, creator_start: Option<SystemTime>) -> bool {
    match creator_start {
        None => true,
        // Start times are known to 1/100 s and the namespace time to the filesystem's resolution; a second
        // of slack keeps a living creator from ever being taken for a newer process.
        Some(start) => start > made + Duration::from_secs(1),
    }
}

/// When process `pid` started, or None if it is not running.
fn process_start(pid: u32) -> Option<SystemTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces, so fields are counted after the
    // last ')'; the start time is field 22, i.e. the 20th after the name.
    let after = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: u64 = boot
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // /proc reports times in USER_HZ, which the kernel fixes at 100 on the architectures we run on;
    // reading it through sysconf would need unsafe code for no gain.
    Some(UNIX_EPOCH + Duration::from_secs(btime) + Duration::from_millis(ticks * 10))
}

fn switch_port(i: usize) -> String {
    format!("h{i}")
}

fn host_octet(i: usize) -> u8 {
    // `new` limits the number of hosts to MAX_HOSTS, so i + 1 fits.
    u8::try_from(i + 1).unwrap_or(u8::MAX)
}

/// Fails with a clear message when this process is not root, the only way tests make namespaces here.
fn check_root() -> Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .ok_or_else(|| anyhow!("no Uid line in /proc/self/status"))?;
    if euid != "0" {
        bail!(
            "network namespaces need root (effective uid here is {euid}): run these tests as root, as CI does"
        );
    }
    Ok(())
}

/// Runs `ip ARGS`, failing with its standard error.
fn ip(args: &[&str]) -> Result<()> {
    run("ip", args)
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let output = crate::command(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                anyhow!("{program} not found (iproute2): run scripts/install-deps")
            } else {
                anyhow!(e).context(format!("running {program} {}", args.join(" ")))
            }
        })?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed with {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn shape_device(ns: &str, dev: &str, delay_ms: u32, rate_mbit: u32) -> Result<()> {
    if delay_ms == 0 && rate_mbit == 0 {
        // Deleting the root qdisc restores the default; it fails when there was nothing to delete, which
        // is what was asked for anyway.
        let _ = run("tc", &["-n", ns, "qdisc", "del", "dev", dev, "root"]);
        return Ok(());
    }
    let mut args: Vec<String> = ["-n", ns, "qdisc", "replace", "dev", dev, "root"]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
    if delay_ms > 0 {
        args.extend(["netem".into(), "delay".into(), format!("{delay_ms}ms")]);
        if rate_mbit > 0 {
            args.extend(["rate".into(), format!("{rate_mbit}mbit")]);
        }
        // A queue long enough for a fast link's bandwidth-delay product, so the delay does not also drop.
        args.extend(["limit".into(), "100000".into()]);
    } else {
        // The bucket must hold at least one full packet and about 10 ms of traffic at the rate, or tbf
        // cannot reach the rate with the kernel's timer granularity.
        let burst = (u64::from(rate_mbit) * 1_000_000 / 8 / 100).max(64 * 1024);
        args.extend([
            "tbf".into(),
            "rate".into(),
            format!("{rate_mbit}mbit"),
            "burst".into(),
            burst.to_string(),
            "latency".into(),
            "100ms".into(),
        ]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("tc", &args).map_err(|e| {
        if delay_ms > 0 && format!("{e:#}").contains("unknown") {
            e.context(
                "this kernel has no netem qdisc (sch_netem), so a delay cannot be added; a rate alone works",
            )
        } else {
            e
        }
    })
}

/// Kills whatever still runs in namespace `ns`, then deletes it.
fn remove_namespace(ns: &str) -> Result<()> {
    if !Path::new(NETNS_DIR).join(ns).exists() {
        return Ok(());
    }
    let output = crate::command("ip")
        .args(["netns", "pids", ns])
        .stdin(Stdio::null())
        .output()
        .context("listing the processes in the namespace")?;
    let pids: Vec<String> = String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter(|p| p.parse::<u32>().is_ok())
        .map(str::to_owned)
        .collect();
    if !pids.is_empty() {
        let mut args = vec!["-KILL"];
        args.extend(pids.iter().map(String::as_str));
        // A process may exit between the listing and the kill; the namespace is deleted either way.
        let _ = run("kill", &args);
    }
    ip(&["netns", "del", ns])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::process::Child;
    use std::time::Instant;

    /// A TCP server for the tests: answers every connection with `reply` (or `size` bytes of `x` when
    /// `size` is given) and closes it; prints `ready` once listening.
    const SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
payload = b"x" * int(sys.argv[3]) if len(sys.argv) > 3 else sys.argv[2].encode()
while True:
    c, _ = s.accept()
    c.sendall(payload)
    c.close()
"#;
    const PORT: u16 = 7000;

    struct Server(Child);

    impl Drop for Server {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn serve(hosts: &Hosts, i: usize, reply: &str, size: Option<usize>) -> Server {
        let mut cmd = hosts.command(i, "python3");
        cmd.args(["-c", SERVER, &PORT.to_string(), reply]);
        if let Some(size) = size {
            cmd.arg(size.to_string());
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "the test server on host {i} did not start"
        );
        Server(child)
    }

    /// Connects from host `from` to host `to` (bash's /dev/tcp, under a timeout) and returns what the
    /// server sent, or None if the connection failed or hung.
    fn fetch(hosts: &Hosts, from: usize, to: usize, timeout_s: f32) -> Option<Vec<u8>> {
        let script = format!("exec 3<>/dev/tcp/{}/{PORT} && cat <&3", hosts.addr(to));
        let output = hosts
            .command(from, "timeout")
            .args([&format!("{timeout_s}"), "bash", "-c", &script])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        output.status.success().then_some(output.stdout)
    }

    fn namespaces() -> String {
        let output = Command::new("ip").args(["netns", "list"]).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    #[test]
    fn three_hosts_reach_each_other_and_a_cut_host_is_partitioned_until_healed() {
        let hosts = Hosts::new(3).unwrap();
        assert_eq!(hosts.len(), 3);
        for i in 0..3 {
            assert!(hosts.name(i).starts_with(hosts.prefix()));
            assert!(
                hosts
                    .prefix()
                    .starts_with(&format!("hearth-{}-", std::process::id()))
            );
            let IpAddr::V4(v4) = hosts.addr(i) else {
                panic!("not IPv4")
            };
            assert_eq!(v4.octets()[0], 10);
            assert_eq!(v4.octets()[3], i as u8 + 1);
        }
        let _servers: Vec<Server> = (0..3)
            .map(|i| serve(&hosts, i, &format!("host{i}"), None))
            .collect();
        // Each host answers with its own name, so a reply proves the packet reached the right host.
        for from in 0..3 {
            for to in 0..3 {
                let got = fetch(&hosts, from, to, 5.0);
                assert_eq!(
                    got.as_deref(),
                    Some(format!("host{to}").as_bytes()),
                    "{from} -> {to}"
                );
            }
        }
        // Nothing of the set leaks into the machine's own network namespace.
        let own = Command::new("ip").args(["-o", "addr"]).output().unwrap();
        assert!(!String::from_utf8_lossy(&own.stdout).contains(&hosts.addr(0).to_string()));

        hosts.cut(2).unwrap();
        assert_eq!(fetch(&hosts, 0, 1, 5.0).as_deref(), Some(&b"host1"[..]));
        assert_eq!(fetch(&hosts, 1, 0, 5.0).as_deref(), Some(&b"host0"[..]));
        assert_eq!(fetch(&hosts, 0, 2, 1.0), None, "0 -> 2 while 2 is cut off");
        assert_eq!(fetch(&hosts, 2, 1, 1.0), None, "2 -> 1 while 2 is cut off");
        // Host 2 itself still works locally: the cut is in the network, not on the host.
        assert_eq!(fetch(&hosts, 2, 2, 5.0).as_deref(), Some(&b"host2"[..]));

        hosts.heal(2).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (a, b) = (fetch(&hosts, 0, 2, 2.0), fetch(&hosts, 2, 1, 2.0));
            if a.as_deref() == Some(&b"host2"[..]) && b.as_deref() == Some(&b"host1"[..]) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "host 2 unreachable after heal: {a:?} {b:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[test]
    fn drop_removes_the_namespaces_and_their_processes_even_after_a_panic() {
        let hosts = Hosts::new(2).unwrap();
        let prefix = hosts.prefix().to_string();
        let mut sleeper = hosts.command(1, "sleep").arg("600").spawn().unwrap();
        assert!(namespaces().contains(&format!("{prefix}1")));
        assert!(namespaces().contains(&format!("{prefix}sw")));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _owned = hosts;
            panic!("a failing test");
        }));
        assert!(result.is_err());
        assert!(
            !namespaces().contains(&prefix),
            "namespaces left behind: {}",
            namespaces()
        );
        // The process left running on host 1 was killed, or the namespace would have lived on.
        let deadline = Instant::now() + Duration::from_secs(5);
        while sleeper.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the process on host 1 survived");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn shape_limits_the_rate_and_unshape_restores_it() {
        let hosts = Hosts::new(2).unwrap();
        let size = 2_000_000;
        let _server = serve(&hosts, 1, "", Some(size));
        // 16 Mbit/s is 2 MB/s, so two megabytes take about a second (less the 64 KiB bucket); unshaped, a
        // veth moves them in milliseconds, so even a loaded machine stays far under half of that.
        hosts.shape(1, 0, 16).unwrap();
        let start = Instant::now();
        let got = fetch(&hosts, 0, 1, 10.0).unwrap();
        let shaped = start.elapsed();
        assert_eq!(got.len(), size);
        assert!(
            shaped >= Duration::from_millis(800),
            "shaped transfer took {shaped:?}"
        );

        hosts.shape(1, 0, 0).unwrap();
        let start = Instant::now();
        assert_eq!(fetch(&hosts, 0, 1, 10.0).unwrap().len(), size);
        let free = start.elapsed();
        assert!(free < shaped / 2, "unshaped {free:?} vs shaped {shaped:?}");

        // A delay needs netem, which some kernels (this CI's among them) lack; then the error must say so.
        match hosts.shape(1, 60, 0) {
            Ok(()) => {
                let start = Instant::now();
                fetch(&hosts, 0, 1, 10.0).unwrap();
                assert!(start.elapsed() >= Duration::from_millis(120));
            }
            Err(e) => assert!(format!("{e:#}").contains("netem"), "{e:#}"),
        }
    }

    #[test]
    fn stale_namespaces_of_dead_processes_are_removed_and_live_ones_kept() {
        let live = Hosts::new(1).unwrap();
        let mut child = Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let stale = format!("{NAME_PREFIX}{dead_pid}-0badf00d-0");
        // The pid of a process that just exited is not reused this quickly on a machine with the default
        // pid range, so this names a namespace whose creator is gone.
        ip(&["netns", "add", &stale]).unwrap();
        let other = format!("{NAME_PREFIX}not-a-test-namespace");
        ip(&["netns", "add", &other]).unwrap();
        let removed = cleanup_stale().unwrap();
        let listed = namespaces();
        let _ = ip(&["netns", "del", &other]);
        let _ = ip(&["netns", "del", &stale]);
        assert!(removed.contains(&stale), "{removed:?}");
        assert!(!listed.contains(&stale));
        assert!(
            listed.contains(&other),
            "names of another form are never touched"
        );
        assert!(
            listed.contains(live.name(0)),
            "a living process's namespace is kept"
        );
    }

    #[test]
    fn names_and_staleness_rules() {
        assert_eq!(creator_pid("hearth-123-00ab-0"), Some(123));
        assert_eq!(creator_pid("hearth-123-00ab-sw"), Some(123));
        assert_eq!(creator_pid("hearth-123-00ab-bench-a"), Some(123));
        assert_eq!(creator_pid("hearth-123-xyz-0"), None);
        assert_eq!(creator_pid("hearth-123-00ab"), None);
        assert_eq!(creator_pid("hearth-abc-00ab-0"), None);
        assert_eq!(creator_pid("other-123-00ab-0"), None);
        let made = UNIX_EPOCH + Duration::from_secs(1_000);
        assert!(is_stale(made, None), "no such process");
        assert!(
            !is_stale(made, Some(made - Duration::from_secs(60))),
            "creator still runs"
        );
        assert!(
            !is_stale(made, Some(made + Duration::from_millis(500))),
            "within the slack"
        );
        assert!(
            is_stale(made, Some(made + Duration::from_secs(60))),
            "pid reused"
        );
        // This process is running, so its start time is known and in the past.
        let me = process_start(std::process::id()).unwrap();
        assert!(me <= SystemTime::now() + Duration::from_secs(1));
        assert!(me > SystemTime::now() - Duration::from_secs(24 * 3600));
    }

    #[test]
    fn bad_host_counts_are_refused() {
        assert!(Hosts::new(0).is_err());
        assert!(Hosts::new(MAX_HOSTS + 1).is_err());
    }
}
