//! A small Prometheus registry for what this API node sees: requests by route and
//! status, executions submitted and finished by state, open WebSockets. Gauges about
//! the platform (queue length, running, warm sandboxes) come from the store's active
//! counts (maintained on every state change, O(1) to read: a scrape never scans the
//! executions) and the host statuses, and are passed to [`Metrics::render`].

use hatchery_scheduler::bus::{group_totals, GroupTotals, HostStatus};
use hatchery_scheduler::model::GroupStatus;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, String, u16), u64>>,
    submitted: AtomicU64,
    finished: Mutex<BTreeMap<&'static str, u64>>,
    websockets: AtomicI64,
}

/// Platform gauges read at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    pub queued: u64,
    pub running: u64,
    /// (agent, language, frozen sandboxes).
    pub warm: Vec<(String, String, u32)>,
    pub agents: u64,
    /// The statuses of the hosts that report (per-host gauges).
    pub hosts: Vec<HostStatus>,
    /// What the autoscaler last published about the groups it scales.
    pub groups: Vec<GroupStatus>,
}

impl Metrics {
    pub fn request(&self, route: &'static str, method: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((route, method.to_string(), status)).or_default() += 1;
    }

    pub fn submitted(&self) {
        self.submitted.fetch_add(1, Ordering::Relaxed);
    }

    pub fn finished(&self, state: &'static str) {
        let mut m = self.finished.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(state).or_default() += 1;
    }

    pub fn websocket_opened(&self) {
        self.websockets.fetch_add(1, Ordering::Relaxed);
    }

    pub fn websocket_closed(&self) {
        self.websockets.fetch_sub(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition format (0.0.4).
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::new();
        out.push_str(
            "# HELP hatchery_http_requests_total HTTP requests answered, by route template, method and status.\n\
             # TYPE hatchery_http_requests_total counter\n",
        );
        for ((route, method, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "hatchery_http_requests_total{{route=\"{}\",method=\"{}\",status=\"{}\"}} {}",
                escape(route),
                escape(method),
                status,
                n
            );
        }
        out.push_str(
            "# HELP hatchery_executions_submitted_total Executions admitted through this API node.\n\
             # TYPE hatchery_executions_submitted_total counter\n",
        );
        let _ = writeln!(
            out,
            "hatchery_executions_submitted_total {}",
            self.submitted.load(Ordering::Relaxed)
        );
        out.push_str(
            "# HELP hatchery_executions_finished_total Executions seen finishing, by final state.\n\
             # TYPE hatchery_executions_finished_total counter\n",
        );
        for (state, n) in self
            .finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "hatchery_executions_finished_total{{state=\"{state}\"}} {n}"
            );
        }
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            );
        };
        gauge(
            &mut out,
            "hatchery_queue_length",
            "Executions queued, waiting for a sandbox.",
            g.queued,
        );
        gauge(
            &mut out,
            "hatchery_executions_running",
            "Executions running now.",
            g.running,
        );
        gauge(
            &mut out,
            "hatchery_agents",
            "Agents that reported their status recently.",
            g.agents,
        );
        gauge(
            &mut out,
            "hatchery_websockets_open",
            "WebSocket connections open on this API node.",
            self.websockets.load(Ordering::Relaxed).max(0) as u64,
        );
        out.push_str(
            "# HELP hatchery_warm_sandboxes Frozen sandboxes ready to be claimed, by agent and language.\n\
             # TYPE hatchery_warm_sandboxes gauge\n",
        );
        for (agent, lang, n) in &g.warm {
            let _ = writeln!(
                out,
                "hatchery_warm_sandboxes{{agent=\"{}\",language=\"{}\"}} {}",
                escape(agent),
                escape(lang),
                n
            );
        }
        render_hosts(&mut out, &g.hosts);
        render_groups(&mut out, &g.hosts);
        render_scaled_groups(&mut out, &g.groups);
        out
    }
}

/// Per-host gauges (R13): what the machine does, what the host has for executions and
/// what the limits of its running executions take of it.
fn render_hosts(out: &mut String, hosts: &[HostStatus]) {
    type Value = fn(&HostStatus) -> f64;
    let families: [(&str, &str, Value); 11] = [
        ("hatchery_host_cpu_busy_ratio", "Share of the host machine's CPUs busy since its previous status (0 to 1).", |s| s.load.cpu_busy),
        ("hatchery_host_memory_used_bytes", "Memory in use on the host machine (not available).", |s| s.load.memory_used_bytes as f64),
        ("hatchery_host_memory_total_bytes", "Memory of the host machine.", |s| s.load.memory_total_bytes as f64),
        ("hatchery_host_cpu_pressure", "Percentage of the last 10 s some task waited for CPU on the host machine (PSI some avg10).", |s| s.load.cpu_pressure),
        ("hatchery_host_memory_pressure", "Percentage of the last 10 s some task waited for memory on the host machine (PSI some avg10).", |s| s.load.memory_pressure),
        ("hatchery_host_allocatable_memory_bytes", "Memory the host has for executions.", |s| s.allocatable.memory_bytes as f64),
        ("hatchery_host_allocatable_cpus", "CPUs the host has for executions.", |s| s.allocatable.cpus),
        ("hatchery_host_limits_memory_bytes", "Memory limits of the executions running on the host, summed.", |s| s.used().memory_bytes as f64),
        ("hatchery_host_limits_cpus", "CPU limits of the executions running on the host, summed.", |s| s.used().cpus),
        ("hatchery_host_running", "Executions running on the host.", |s| f64::from(s.running)),
        ("hatchery_host_draining", "1 while the host drains.", |s| if s.draining { 1.0 } else { 0.0 }),
    ];
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for s in hosts {
            let _ = writeln!(out, "{name}{{agent=\"{}\"}} {}", escape(&s.agent), value(s));
        }
    }
}

/// Per-group gauges the autoscaler publishes: pending demand, hosts on their way and
/// being removed, room kept for active users.
fn render_scaled_groups(out: &mut String, groups: &[GroupStatus]) {
    type Value = fn(&GroupStatus) -> f64;
    let families: [(&str, &str, Value); 6] = [
        (
            "hatchery_group_pending",
            "Executions waiting because no live host can take them, counted against the group.",
            |g| f64::from(g.pending),
        ),
        (
            "hatchery_group_pending_memory_bytes",
            "Memory limits of the executions pending for the group.",
            |g| g.pending_need.memory_bytes as f64,
        ),
        (
            "hatchery_group_provisioning",
            "Hosts of the group launched and not reporting yet.",
            |g| f64::from(g.provisioning),
        ),
        (
            "hatchery_group_terminating",
            "Hosts of the group being removed.",
            |g| f64::from(g.terminating),
        ),
        (
            "hatchery_group_reserved",
            "Runs' worth of room kept in the group for active users.",
            |g| f64::from(g.reserved),
        ),
        (
            "hatchery_group_reserved_memory_bytes",
            "Memory of the room kept in the group for active users.",
            |g| g.reserved_need.memory_bytes as f64,
        ),
    ];
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for g in groups {
            let _ = writeln!(out, "{name}{{group=\"{}\"}} {}", escape(&g.group), value(g));
        }
    }
}

/// Per-group gauges from the statuses of the hosts that report a group: hosts, what they
/// have for executions, and what the limits of what runs take of it.
fn render_groups(out: &mut String, hosts: &[HostStatus]) {
    let groups = group_totals(hosts);
    type Value = fn(&GroupTotals) -> f64;
    let families: [(&str, &str, Value); 5] = [
        (
            "hatchery_group_hosts",
            "Hosts of the group that report.",
            |v| f64::from(v.hosts()),
        ),
        (
            "hatchery_group_capacity_memory_bytes",
            "Memory the group's hosts have for executions.",
            |v| v.capacity.memory_bytes as f64,
        ),
        (
            "hatchery_group_capacity_cpus",
            "CPUs the group's hosts have for executions.",
            |v| v.capacity.cpus,
        ),
        (
            "hatchery_group_used_memory_bytes",
            "Memory limits of what runs on the group's hosts.",
            |v| v.used.memory_bytes as f64,
        ),
        (
            "hatchery_group_used_cpus",
            "CPU limits of what runs on the group's hosts.",
            |v| v.used.cpus,
        ),
    ];
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (g, v) in &groups {
            let _ = writeln!(out, "{name}{{group=\"{}\"}} {}", escape(g), value(v));
        }
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges() {
        let m = Metrics::default();
        m.request("/v1/executions", "POST", 202);
        m.request("/v1/executions", "POST", 202);
        m.submitted();
        m.finished("succeeded");
        let text = m.render(&Gauges {
            queued: 3,
            running: 1,
            warm: vec![("local".into(), "r".into(), 2)],
            agents: 1,
            hosts: vec![HostStatus {
                agent: "host-\"a\"".into(),
                group: Some("big".into()),
                at: 1,
                capacity: 4,
                running: 1,
                allocatable: hatchery_scheduler::model::Resources::new(8 << 30, 4.0),
                draining: true,
                state: Default::default(),
                load: hatchery_scheduler::bus::HostLoad {
                    cpu_busy: 0.25,
                    memory_total_bytes: 16 << 30,
                    memory_used_bytes: 3 << 30,
                    cpu_pressure: 7.5,
                    memory_pressure: 0.0,
                },
                warm: vec![("r".into(), 2)],
                sandboxes: vec![hatchery_scheduler::bus::SandboxUsage {
                    execution_id: "e1".into(),
                    org: "o".into(),
                    user: "u".into(),
                    usage: Default::default(),
                    limits: hatchery_scheduler::model::Resources::new(1 << 30, 1.5),
                }],
            }],
            groups: vec![GroupStatus {
                group: "big".into(),
                pending: 3,
                pending_need: hatchery_scheduler::model::Resources::new(12 << 30, 3.0),
                provisioning: 1,
                reserved: 2,
                ..GroupStatus::default()
            }],
        });
        assert!(text.contains(
            "hatchery_http_requests_total{route=\"/v1/executions\",method=\"POST\",status=\"202\"} 2"
        ));
        assert!(text.contains("hatchery_executions_finished_total{state=\"succeeded\"} 1"));
        assert!(text.contains("hatchery_queue_length 3"));
        assert!(text.contains("hatchery_warm_sandboxes{agent=\"local\",language=\"r\"} 2"));
        for line in [
            "hatchery_host_cpu_busy_ratio{agent=\"host-\\\"a\\\"\"} 0.25",
            "hatchery_host_memory_used_bytes{agent=\"host-\\\"a\\\"\"} 3221225472",
            "hatchery_host_cpu_pressure{agent=\"host-\\\"a\\\"\"} 7.5",
            "hatchery_host_allocatable_cpus{agent=\"host-\\\"a\\\"\"} 4",
            "hatchery_host_limits_memory_bytes{agent=\"host-\\\"a\\\"\"} 1073741824",
            "hatchery_host_limits_cpus{agent=\"host-\\\"a\\\"\"} 1.5",
            "hatchery_host_draining{agent=\"host-\\\"a\\\"\"} 1",
            "hatchery_group_hosts{group=\"big\"} 1",
            "hatchery_group_capacity_memory_bytes{group=\"big\"} 8589934592",
            "hatchery_group_used_cpus{group=\"big\"} 1.5",
            "hatchery_group_pending{group=\"big\"} 3",
            "hatchery_group_pending_memory_bytes{group=\"big\"} 12884901888",
            "hatchery_group_provisioning{group=\"big\"} 1",
            "hatchery_group_reserved{group=\"big\"} 2",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }
}
