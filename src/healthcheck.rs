//! `facerec healthcheck`: asks the server on this machine for `GET /health` and succeeds only on a
//! 200, so a container HEALTHCHECK needs neither curl nor a shell. reqwest's blocking client,
//! bounded by the timeout.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use clap::Args;

use crate::config::parse_duration;

/// Where the server listens (the same HOST and PORT as `serve`).
#[derive(Debug, Clone, Args)]
pub struct HealthcheckArgs {
    /// The server's listening address; 0.0.0.0, :: and localhost are asked on the loopback.
    #[arg(long, env = "HOST", default_value = "0.0.0.0")]
    pub host: String,

    #[arg(long, env = "PORT", default_value_t = 8000)]
    pub port: u16,

    /// How long the whole exchange may take.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// The address to ask: a wildcard or `localhost` becomes the loopback of the same family.
pub fn target(host: &str, port: u16) -> Result<SocketAddr, String> {
    let ip = match host {
        "localhost" => IpAddr::V4(Ipv4Addr::LOCALHOST),
        h => match h.parse::<IpAddr>().map_err(|_| format!("HOST '{h}' is not an IP address"))? {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        },
    };
    Ok(SocketAddr::new(ip, port))
}

/// `GET /health`; `Ok` with the status line on a 200, else why not. reqwest's blocking client,
/// the whole exchange (connect included) bounded by the timeout, no proxy.
pub fn check(args: &HealthcheckArgs) -> Result<String, String> {
    let addr = target(&args.host, args.port)?;
    // reqwest is built with rustls but no bundled provider: ring, as everywhere in facerec.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::blocking::Client::builder()
        .timeout(args.timeout)
        .connect_timeout(args.timeout)
        .user_agent("facerec-healthcheck")
        .no_proxy()
        .build()
        .map_err(|e| format!("HTTP client: {e}"))?;
    let response = client.get(format!("http://{addr}/health")).send().map_err(|e| format!("GET /health on {addr}: {e}"))?;
    let status_line = format!("{:?} {}", response.version(), response.status());
    if response.status() == reqwest::StatusCode::OK { Ok(status_line) } else { Err(format!("GET /health on {addr}: {status_line}")) }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    #[test]
    fn wildcards_are_asked_on_the_loopback() {
        assert_eq!(target("0.0.0.0", 8000).unwrap(), "127.0.0.1:8000".parse().unwrap());
        assert_eq!(target("localhost", 1).unwrap(), "127.0.0.1:1".parse().unwrap());
        assert_eq!(target("::", 9).unwrap(), "[::1]:9".parse().unwrap());
        assert_eq!(target("10.1.2.3", 80).unwrap(), "10.1.2.3:80".parse().unwrap());
        assert!(target("example.org", 80).is_err());
    }

    #[test]
    fn a_closed_port_fails() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let args = HealthcheckArgs { host: "127.0.0.1".into(), port, timeout: Duration::from_secs(2) };
        assert!(check(&args).is_err());
    }

    #[test]
    fn only_a_200_passes() {
        for (answer, ok) in [("HTTP/1.1 200 OK\r\n\r\n{}", true), ("HTTP/1.1 503 Service Unavailable\r\n\r\n", false), ("garbage", false)] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let server = std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let mut req = [0u8; 1024];
                let _ = s.read(&mut req).unwrap();
                s.write_all(answer.as_bytes()).unwrap();
            });
            let args = HealthcheckArgs { host: "0.0.0.0".into(), port, timeout: Duration::from_secs(5) };
            assert_eq!(check(&args).is_ok(), ok, "{answer}");
            server.join().unwrap();
        }
    }
}
