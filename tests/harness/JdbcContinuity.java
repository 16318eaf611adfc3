// pgjdbc connections driven call by call from standard input, each call answered when it is done,
// so that a test can leave a statement or a COMMIT in flight on one connection, crash the
// database, and read the answer afterwards (tests/harness/jdbc.py, JdbcCalls, runs it).
//
//   java -cp /usr/share/java/postgresql.jar JdbcContinuity.java HOST PORT DB USER PASSWORD
//
// Input, one call a line, fields separated by tabs: ID CONN OP ARGS...
//   open AUTOCOMMIT PREPARE_THRESHOLD APPLICATION_NAME   connects (CONN is a name of the test's)
//   update SQL PARAM...   a PreparedStatement (extended protocol), string parameters: the count
//   query SQL PARAM...    the rows, each row's columns joined by ',' and rows by ';'
//   commit | rollback | close
// Each connection runs its calls in order on a thread of its own; the line returns at once.
// Output, one line per call when it is done: "ID ok VALUE" or "ID err SQLSTATE MESSAGE" (tabs).
// End of input closes every connection and exits.

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.util.Arrays;
import java.util.HashMap;
import java.util.Map;
import java.util.Properties;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;

public class JdbcContinuity {
    private static String url;
    private static String user;
    private static String password;

    private static final class Client {
        final ExecutorService thread = Executors.newSingleThreadExecutor();
        Connection conn;
    }

    private static synchronized void answer(String line) {
        System.out.println(line);
        System.out.flush();
    }

    private static String flat(String text) {
        return text == null ? "" : text.replace('\t', ' ').replace('\n', ' ').replace('\r', ' ');
    }

    private static PreparedStatement prepare(Connection conn, String[] call) throws SQLException {
        PreparedStatement ps = conn.prepareStatement(call[3]);
        for (int i = 4; i < call.length; i++) {
            ps.setString(i - 3, call[i]);
        }
        return ps;
    }

    private static String run(Client client, String[] call) throws SQLException {
        String op = call[2];
        if (op.equals("open")) {
            Properties props = new Properties();
            props.setProperty("user", user);
            props.setProperty("password", password);
            props.setProperty("connectTimeout", "15");
            props.setProperty("socketTimeout", "90");
            props.setProperty("prepareThreshold", call[4]);
            props.setProperty("ApplicationName", call[5]);
            // In the startup packet (the sidecar logs it at login), not in a SET after it.
            props.setProperty("assumeMinServerVersion", "10");
            client.conn = DriverManager.getConnection(url, props);
            client.conn.setAutoCommit(Boolean.parseBoolean(call[3]));
            return "";
        }
        Connection conn = client.conn;
        switch (op) {
            case "update":
                try (PreparedStatement ps = prepare(conn, call)) {
                    return Integer.toString(ps.executeUpdate());
                }
            case "query":
                try (PreparedStatement ps = prepare(conn, call); ResultSet rs = ps.executeQuery()) {
                    StringBuilder rows = new StringBuilder();
                    int columns = rs.getMetaData().getColumnCount();
                    while (rs.next()) {
                        if (rows.length() > 0) {
                            rows.append(';');
                        }
                        for (int c = 1; c <= columns; c++) {
                            rows.append(c > 1 ? "," : "").append(rs.getString(c));
                        }
                    }
                    return rows.toString();
                }
            case "commit":
                conn.commit();
                return "";
            case "rollback":
                conn.rollback();
                return "";
            case "close":
                conn.close();
                return "";
            default:
                throw new SQLException("unknown call " + op, "XXBAD");
        }
    }

    public static void main(String[] args) throws Exception {
        url = "jdbc:postgresql://" + args[0] + ":" + args[1] + "/" + args[2];
        user = args[3];
        password = args[4];
        Map<String, Client> clients = new HashMap<>();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in));
        String line;
        while ((line = in.readLine()) != null) {
            String[] call = line.split("\t", -1);
            String id = call[0];
            Client client = clients.computeIfAbsent(call[1], name -> new Client());
            client.thread.submit(() -> {
                try {
                    answer(id + "\tok\t" + flat(run(client, call)));
                } catch (SQLException e) {
                    answer(id + "\terr\t" + e.getSQLState() + "\t" + flat(e.getMessage()));
                } catch (RuntimeException e) {
                    answer(id + "\terr\tJAVA\t" + flat(e.toString()) + " " + Arrays.toString(e.getStackTrace()));
                }
            });
        }
        for (Client client : clients.values()) {
            client.thread.submit(() -> {
                try {
                    if (client.conn != null) {
                        client.conn.close();
                    }
                } catch (SQLException ignored) {
                    // broken already: nothing to close
                }
            });
            client.thread.shutdown();
        }
        for (Client client : clients.values()) {
            client.thread.awaitTermination(30, TimeUnit.SECONDS);
        }
    }
}
