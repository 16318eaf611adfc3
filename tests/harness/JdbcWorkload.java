// A JDBC workload for the integration tests (tests/harness/jdbc.py runs it): pgjdbc's server-prepared
// statements (named S_1, S_2, ... per connection, in the order each connection prepares them)
// through a sidecar: in transaction mode the few servers every connection shares.
//
// Run as a single source file (Java 11+), with Debian's pgjdbc on the class path:
//   java -cp /usr/share/java/postgresql.jar JdbcWorkload.java HOST PORT DB USER PASSWORD TABLE REF WORKERS ROUNDS
//
// Worker w (a thread with a connection of its own) cycles through five statements starting at the
// w-th, so the same S_n names a different text on each connection; every fourth round runs in an
// explicit transaction. Worker 0 sets its isolation level to SERIALIZABLE through the JDBC API (a
// SET SESSION CHARACTERISTICS, which must follow it from server to server and reach nobody else:
// every explicit transaction checks its level), worker 1 forces binary transfer
// (prepareThreshold=-1), worker 2 keeps only two statements in pgjdbc's cache (evictions send
// Close, then a new Parse), worker 3 runs DEALLOCATE ALL every 25 rounds (pgjdbc drops its cache
// when it sees that command tag). Inserts go in as a batch of two rows (pgjdbc's executeBatch: two
// Bind/Execute pairs before one Sync); every tenth round asks Connection.isValid (an empty query,
// what connection pools test with).
// Prints one "ERROR ..." line per failed round and, last, "inserted=N errors=E"; exits 1 on errors.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.atomic.AtomicInteger;

public class JdbcWorkload {
    static String url;
    static String user;
    static String password;
    static String table;
    static String ref;
    static int rounds;
    static final AtomicInteger inserted = new AtomicInteger();
    static final AtomicInteger errors = new AtomicInteger();

    public static void main(String[] args) throws Exception {
        url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/" + args[2];
        user = args[3];
        password = args[4];
        table = args[5];
        ref = args[6];
        int workers = Integer.parseInt(args[7]);
        rounds = Integer.parseInt(args[8]);
        List<Thread> threads = new ArrayList<>();
        for (int w = 0; w < workers; w++) {
            final int worker = w;
            Thread t = new Thread(() -> work(worker));
            threads.add(t);
            t.start();
        }
        for (Thread t : threads) {
            t.join();
        }
        System.out.println("inserted=" + inserted.get() + " errors=" + errors.get());
        System.exit(errors.get() == 0 ? 0 : 1);
    }

    static Connection connect(int worker) throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", user);
        props.setProperty("password", password);
        props.setProperty("connectTimeout", "5");
        props.setProperty("socketTimeout", "60");
        props.setProperty("prepareThreshold", worker == 1 ? "-1" : "1");
        if (worker == 2) {
            props.setProperty("preparedStatementCacheQueries", "2");
        }
        return DriverManager.getConnection(url, props);
    }

    static void work(int w) {
        try (Connection conn = connect(w)) {
            String isolation = "read committed";
            if (w == 0) {
                conn.setTransactionIsolation(Connection.TRANSACTION_SERIALIZABLE);
                isolation = "serializable";
            }
            for (int i = 0; i < rounds; i++) {
                try {
                    boolean block = i % 4 == 0;
                    if (block) {
                        conn.setAutoCommit(false);
                    }
                    step(conn, w, i);
                    if (block) {
                        try (Statement st = conn.createStatement();
                             ResultSet rs = st.executeQuery("SHOW transaction_isolation")) {
                            rs.next();
                            expect(rs.getString(1), isolation);
                        }
                        conn.commit();
                        conn.setAutoCommit(true);
                    }
                    if (i % 10 == 9 && !conn.isValid(5)) {
                        throw new AssertionError("isValid said false");
                    }
                    if (w == 3 && i % 25 == 24) {
                        try (Statement st = conn.createStatement()) {
                            st.execute("DEALLOCATE ALL");
                        }
                    }
                } catch (SQLException | AssertionError e) {
                    errors.incrementAndGet();
                    System.out.println("ERROR worker " + w + " round " + i + ": " + e);
                    if (!conn.getAutoCommit()) {
                        conn.rollback();
                        conn.setAutoCommit(true);
                    }
                }
            }
        } catch (SQLException e) {
            errors.incrementAndGet();
            System.out.println("ERROR worker " + w + ": " + e);
        }
    }

    static void step(Connection conn, int w, int i) throws SQLException {
        // A new PreparedStatement each round, as application code does: pgjdbc's per-connection
        // cache hands back the server-side statement it prepared for the same text.
        switch ((w + i) % 5) {
            case 0:
                try (PreparedStatement ps = conn.prepareStatement("SELECT ?::int + 1")) {
                    ps.setInt(1, i);
                    expect(one(ps), String.valueOf(i + 1));
                }
                break;
            case 1:
                try (PreparedStatement ps = conn.prepareStatement("SELECT ?::text || '-' || ?::text")) {
                    ps.setString(1, "w" + w);
                    ps.setString(2, String.valueOf(i));
                    expect(one(ps), "w" + w + "-" + i);
                }
                break;
            case 2:
                try (PreparedStatement ps = conn.prepareStatement("SELECT count(*) FROM " + ref + " WHERE id <= ?")) {
                    ps.setInt(1, i % 100);
                    expect(one(ps), String.valueOf(i % 100));
                }
                break;
            case 3:
                try (PreparedStatement ps = conn.prepareStatement("SELECT label FROM " + ref + " WHERE id = ?")) {
                    ps.setInt(1, i % 100 + 1);
                    expect(one(ps), "r" + (i % 100 + 1));
                }
                break;
            default:
                try (PreparedStatement ps = conn.prepareStatement("INSERT INTO " + table + " (w, i) VALUES (?, ?)")) {
                    ps.setInt(1, w);
                    ps.setInt(2, i);
                    ps.addBatch();
                    ps.setInt(1, w);
                    ps.setInt(2, -i - 1);
                    ps.addBatch();
                    int[] counts = ps.executeBatch();
                    if (counts.length != 2 || counts[0] != 1 || counts[1] != 1) {
                        throw new AssertionError("INSERT batch said " + java.util.Arrays.toString(counts));
                    }
                    inserted.addAndGet(2);
                }
        }
    }

    static String one(PreparedStatement ps) throws SQLException {
        try (ResultSet rs = ps.executeQuery()) {
            if (!rs.next()) {
                throw new AssertionError("no row");
            }
            String value = rs.getString(1);
            if (rs.next()) {
                throw new AssertionError("more than one row");
            }
            return value;
        }
    }

    static void expect(String got, String want) {
        if (!want.equals(got)) {
            throw new AssertionError("got " + got + ", want " + want);
        }
    }
}
