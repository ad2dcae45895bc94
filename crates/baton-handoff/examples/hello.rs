//! An HTTP/1.1 server that upgrades itself on SIGHUP: `hello 127.0.0.1:8080`, then `kill -HUP <pid>`.
use baton_handoff::Upgrader;
use tokio::{io::AsyncBufReadExt, io::AsyncWriteExt, io::BufReader, signal::unix::SignalKind};

#[tokio::main(flavor = "current_thread")] // No other thread yet when `from_env` reads the environment.
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let upgrader = Upgrader::from_env()?;
    let addr = std::env::args().nth(1).ok_or("usage: hello <ip:port>")?.parse()?;
    let listener = upgrader.listen("http", addr).await?;
    upgrader.ready()?;
    let pid = std::process::id();
    println!("serving pid={pid} on {}", listener.local_addr()?);
    upgrader.upgrade_on(SignalKind::hangup(), |e| eprintln!("upgrade failed: {e}"))?;
    let drain = upgrader.drain();
    loop {
        let conn = tokio::select! { c = listener.accept() => BufReader::new(c?.0), () = upgrader.exit() => break };
        drain.connections().spawn(serve(conn, upgrader.clone()));
    }
    // Idle keep-alive connections close at the deadline: closing at once could fail a request on its way.
    drain.drain_until(std::time::Duration::from_secs(2)).await;
    Ok(())
}

/// Answers each GET on a keep-alive connection; once exiting, with `Connection: close`.
async fn serve(mut conn: BufReader<tokio::net::TcpStream>, upgrader: Upgrader) -> std::io::Result<()> {
    let mut closing = false;
    while !closing {
        let mut head = String::new();
        while conn.read_line(&mut head).await? > 2 {} // To the empty line that ends the head.
        if !head.ends_with("\r\n\r\n") {
            return Ok(()); // End of file.
        }
        closing = upgrader.is_exiting();
        let close = if closing { "Connection: close\r\n" } else { "" };
        let body = format!("hello from pid={}\n", std::process::id());
        let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n{close}\r\n{body}", body.len());
        conn.write_all(answer.as_bytes()).await?;
    }
    Ok(())
}
