//! Proxy settings as the daemon takes them (flags, a JSON or TOML file, the control
//! API) and their translation into the core's [`ProxyConfig`]: URLs parsed, proxy host
//! names resolved here (the core only knows addresses).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::{Deserialize, Serialize};
use usernet_core::proxy::config::{parse_proxy_url, DEFAULT_EXPLICIT_PORT, DEFAULT_HEAD_LIMIT};
use usernet_core::proxy::{parse_no_proxy, parse_ports, ProxyConfig, Upstream};

/// A no_proxy list: one comma-separated string or a list of entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NoProxy {
    Text(String),
    List(Vec<String>),
}

impl NoProxy {
    fn joined(&self) -> String {
        match self {
            NoProxy::Text(s) => s.clone(),
            NoProxy::List(l) => l.join(","),
        }
    }
}

/// Ports as a list or as text (`"80,8080"`, ranges allowed).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Ports {
    Text(String),
    List(Vec<u16>),
}

impl Ports {
    fn ports(&self) -> Result<Vec<u16>, String> {
        match self {
            Ports::Text(s) => parse_ports(s).map_err(|e| e.to_string()),
            Ports::List(l) if l.contains(&0) => Err("port 0 is no port".into()),
            Ports::List(l) => Ok(l.clone()),
        }
    }
}

/// The proxy settings: every field optional (unset fields take the flags' value, then
/// the default).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// `http://[user:pass@]host[:port]` for port-80 traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_proxy: Option<String>,
    /// The same for TLS (`CONNECT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_proxy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_proxy: Option<NoProxy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_ports: Option<Ports>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https_ports: Option<Ports>,
    /// The gateway's explicit proxy port; 0 turns it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explicit_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_limit: Option<usize>,
}

impl ProxySettings {
    /// These settings, with unset fields taken from `base`.
    pub fn or(&self, base: &ProxySettings) -> ProxySettings {
        ProxySettings {
            http_proxy: self.http_proxy.clone().or_else(|| base.http_proxy.clone()),
            https_proxy: self
                .https_proxy
                .clone()
                .or_else(|| base.https_proxy.clone()),
            no_proxy: self.no_proxy.clone().or_else(|| base.no_proxy.clone()),
            http_ports: self.http_ports.clone().or_else(|| base.http_ports.clone()),
            https_ports: self
                .https_ports
                .clone()
                .or_else(|| base.https_ports.clone()),
            explicit_port: self.explicit_port.or(base.explicit_port),
            head_limit: self.head_limit.or(base.head_limit),
        }
    }

    /// Whether these settings turn the proxy on: an upstream, or the explicit port
    /// asked for. Otherwise nothing is intercepted.
    pub fn enabled(&self) -> bool {
        self.http_proxy.as_deref().is_some_and(|s| !s.is_empty())
            || self.https_proxy.as_deref().is_some_and(|s| !s.is_empty())
            || self.explicit_port.is_some_and(|p| p != 0)
    }

    /// The same with passwords in URLs hidden (for `GET /proxy` and logs).
    pub fn redacted(&self) -> ProxySettings {
        let hide = |u: &Option<String>| {
            u.as_ref().map(|u| {
                let (scheme, rest) = match u.split_once("://") {
                    Some((s, r)) => (format!("{s}://"), r),
                    None => (String::new(), u.as_str()),
                };
                match rest.rsplit_once('@') {
                    Some((cred, host)) => {
                        let user = cred.split(':').next().unwrap_or("");
                        format!("{scheme}{user}:***@{host}")
                    }
                    None => u.clone(),
                }
            })
        };
        ProxySettings {
            http_proxy: hide(&self.http_proxy),
            https_proxy: hide(&self.https_proxy),
            ..self.clone()
        }
    }

    /// Read a settings file: TOML when its name ends in `.toml`, JSON otherwise.
    pub fn load(path: &Path) -> Result<ProxySettings, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text, path.extension().is_some_and(|e| e == "toml"))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str, toml: bool) -> Result<ProxySettings, String> {
        if toml {
            toml::from_str(text).map_err(|e| e.to_string())
        } else {
            serde_json::from_str(text).map_err(|e| e.to_string())
        }
    }

    /// Check everything but the names: URLs, rules, ports. The names of proxy hosts
    /// still to resolve are returned with the half-built configuration.
    pub fn prepare(&self) -> Result<Option<Prepared>, String> {
        if !self.enabled() {
            return Ok(None);
        }
        let url = |u: &Option<String>, what: &str| -> Result<Option<_>, String> {
            match u.as_deref().map(str::trim).filter(|u| !u.is_empty()) {
                Some(u) => parse_proxy_url(u)
                    .map(Some)
                    .map_err(|e| format!("{what} {u:?}: {e}")),
                None => Ok(None),
            }
        };
        let http = url(&self.http_proxy, "http proxy")?;
        let https = url(&self.https_proxy, "https proxy")?;
        let exclude = match &self.no_proxy {
            Some(n) => parse_no_proxy(&n.joined()).map_err(|e| e.to_string())?,
            None => Vec::new(),
        };
        let http_ports = match &self.http_ports {
            Some(p) => p.ports()?,
            None => vec![80],
        };
        let https_ports = match &self.https_ports {
            Some(p) => p.ports()?,
            None => vec![443],
        };
        let explicit_port = match self.explicit_port {
            Some(0) => None,
            Some(p) => Some(p),
            None => Some(DEFAULT_EXPLICIT_PORT),
        };
        Ok(Some(Prepared {
            http,
            https,
            config: ProxyConfig {
                http: None,
                https: None,
                exclude,
                http_ports,
                https_ports,
                explicit_port,
                head_limit: self.head_limit.unwrap_or(DEFAULT_HEAD_LIMIT),
            },
        }))
    }
}

/// Settings checked, upstream hosts not yet resolved.
pub struct Prepared {
    http: Option<usernet_core::proxy::ProxyUrl>,
    https: Option<usernet_core::proxy::ProxyUrl>,
    config: ProxyConfig,
}

impl Prepared {
    /// The names to look up (proxy hosts that are no address literal).
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = [&self.http, &self.https]
            .into_iter()
            .flatten()
            .filter(|u| u.ip().is_none())
            .map(|u| u.host.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// The configuration, with `lookup` answering for the names.
    pub fn finish(self, lookup: impl Fn(&str) -> Option<IpAddr>) -> Result<ProxyConfig, String> {
        let up = |u: Option<usernet_core::proxy::ProxyUrl>| -> Result<Option<Upstream>, String> {
            let Some(u) = u else { return Ok(None) };
            let ip = match u.ip() {
                Some(ip) => ip,
                None => lookup(&u.host)
                    .ok_or_else(|| format!("cannot resolve the proxy host {:?}", u.host))?,
            };
            Ok(Some(Upstream {
                addr: SocketAddr::new(ip, u.port),
                authorization: u.authorization,
            }))
        };
        let mut c = self.config;
        c.http = up(self.http)?;
        c.https = up(self.https)?;
        Ok(c)
    }
}

/// Resolve and build a configuration with `resolve` (the host network's resolver).
pub async fn resolve_settings<F, Fut>(
    settings: &ProxySettings,
    resolve: F,
) -> Result<Option<ProxyConfig>, String>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<Vec<IpAddr>>>,
{
    let Some(prepared) = settings.prepare()? else {
        return Ok(None);
    };
    let mut found = Vec::new();
    for name in prepared.names() {
        let addrs = tokio::time::timeout(std::time::Duration::from_secs(10), resolve(name.clone()))
            .await
            .map_err(|_| format!("looking up the proxy host {name:?} timed out"))?
            .map_err(|e| format!("cannot resolve the proxy host {name:?}: {e}"))?;
        // IPv4 first: the usual case, and what a proxy on the host's loopback has.
        let ip = addrs.iter().find(|a| a.is_ipv4()).or_else(|| addrs.first());
        if let Some(ip) = ip {
            found.push((name, *ip));
        }
    }
    prepared
        .finish(|n| found.iter().find(|(f, _)| f == n).map(|(_, ip)| *ip))
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_toml_files_and_merging() {
        let j = ProxySettings::parse(
            r#"{"http_proxy": "http://u:p@proxy.test:3129", "no_proxy": ["a.test", "10.0.0.0/8"], "https_ports": "443,8443"}"#,
            false,
        )
        .unwrap();
        let t = ProxySettings::parse(
            "http_proxy = \"http://u:p@proxy.test:3129\"\nno_proxy = [\"a.test\", \"10.0.0.0/8\"]\nhttps_ports = \"443,8443\"\n",
            true,
        )
        .unwrap();
        assert_eq!(j, t);
        assert!(ProxySettings::parse(r#"{"htp_proxy": "x"}"#, false).is_err());
        let flags = ProxySettings {
            https_proxy: Some("http://10.0.0.1:1".into()),
            http_proxy: Some("http://ignored:1".into()),
            ..Default::default()
        };
        let m = j.or(&flags);
        assert_eq!(m.http_proxy.as_deref(), Some("http://u:p@proxy.test:3129"));
        assert_eq!(m.https_proxy.as_deref(), Some("http://10.0.0.1:1"));
        let p = m.prepare().unwrap().unwrap();
        assert_eq!(p.names(), vec!["proxy.test".to_string()]);
        let c = p.finish(|_| Some("127.0.0.1".parse().unwrap())).unwrap();
        assert_eq!(
            c.http.as_ref().unwrap().addr,
            "127.0.0.1:3129".parse().unwrap()
        );
        assert_eq!(
            c.http.as_ref().unwrap().authorization.as_deref(),
            Some("Basic dTpw")
        );
        assert_eq!(c.https.as_ref().unwrap().authorization, None);
        assert_eq!(c.https_ports, vec![443, 8443]);
        assert_eq!(c.explicit_port, Some(3128));
        assert_eq!(c.exclude.len(), 2);
        assert_eq!(
            m.redacted().http_proxy.as_deref(),
            Some("http://u:***@proxy.test:3129")
        );
        // Unresolvable names, bad URLs and bad rules are errors, not silently dropped.
        let p = m.prepare().unwrap().unwrap();
        assert!(p.finish(|_| None).is_err());
        for bad in [
            r#"{"http_proxy": "socks5://x"}"#,
            r#"{"http_proxy": "http://x", "no_proxy": "10.0.0.0/40"}"#,
            r#"{"http_proxy": "http://x", "http_ports": [0]}"#,
        ] {
            assert!(
                ProxySettings::parse(bad, false).unwrap().prepare().is_err(),
                "{bad}"
            );
        }
        // Nothing configured: no interception; the explicit port alone turns it on.
        assert!(ProxySettings::default().prepare().unwrap().is_none());
        let e = ProxySettings {
            explicit_port: Some(8080),
            ..Default::default()
        };
        let c = e.prepare().unwrap().unwrap().finish(|_| None).unwrap();
        assert_eq!((c.http, c.explicit_port), (None, Some(8080)));
        let off = ProxySettings {
            http_proxy: Some("http://127.0.0.1:1".into()),
            explicit_port: Some(0),
            ..Default::default()
        };
        let c = off.prepare().unwrap().unwrap().finish(|_| None).unwrap();
        assert_eq!(c.explicit_port, None);
    }
}
